"""Every communicator against the loopback specification, on simulated ranks (``fake``)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flashfusemoe.comm import (
    Communicator,
    FakeWorld,
    available_communicators,
    get_communicator,
    register_communicator,
)
from flashfusemoe.comm.fake import FakeCommunicator
from flashfusemoe.comm.loopback import LoopbackCommunicator
from tests.strategies import Problem, problems, randn, topk_ids


def _rank_inputs(p: Problem, rank: int, drop_frac: float = 0.0):
    """Rank-specific tokens (T varies by rank; rank 0 keeps p.T, which may be 0)."""
    T = p.T if rank == 0 else (p.T + 3 * rank) % 9
    ids = topk_ids(p, T=T, salt=rank, drop_frac=drop_frac)
    x = randn(p, T, p.D, salt=10 + rank)
    w = torch.rand(T, p.K, generator=p.gen(20 + rank))
    return x, ids, w


def expected_canonical(p: Problem, rank: int, drop_frac: float):
    """What rank ``rank`` must receive: for each local expert, for each source rank, that source's
    loopback rows of that expert (token-major) -- the canonical order, built from the spec."""
    e = p.E // p.W
    xs, ws, counts = [], [], []
    per_source = []
    for src in range(p.W):
        x, ids, w = _rank_inputs(p, src, drop_frac)
        d = LoopbackCommunicator().dispatch(x, ids, w, num_experts=p.E)
        per_source.append((d, torch.cumsum(d.recv_counts_e, 0) - d.recv_counts_e))
    for expert in range(rank * e, (rank + 1) * e):
        n = 0
        for d, start in per_source:
            lo, c = int(start[expert]), int(d.recv_counts_e[expert])
            xs.append(d.recv_x_RD[lo : lo + c])
            ws.append(d.recv_weights_R[lo : lo + c])
            n += c
        counts.append(n)
    return torch.cat(xs), torch.cat(ws), torch.tensor(counts)


@given(problems(), st.sampled_from([0.0, 0.25]))
def test_fake_dispatch_equals_loopback_canonical_order_bit_exact(p, drop_frac):
    world = FakeWorld(p.W)

    def rank_fn(rank):
        x, ids, w = _rank_inputs(p, rank, drop_frac)
        return FakeCommunicator(world.group(rank)).dispatch(x, ids, w, num_experts=p.E)

    for rank, got in enumerate(world.run(rank_fn)):
        x_exp, w_exp, c_exp = expected_canonical(p, rank, drop_frac)
        assert torch.equal(got.recv_x_RD, x_exp)
        assert torch.equal(got.recv_weights_R, w_exp)
        assert torch.equal(got.recv_counts_e, c_exp)


@given(problems())
def test_rows_received_over_all_ranks_equal_kept_slots(p):
    world = FakeWorld(p.W)

    def rank_fn(rank):
        x, ids, _ = _rank_inputs(p, rank)
        d = FakeCommunicator(world.group(rank)).dispatch(x, ids, num_experts=p.E)
        return d.recv_x_RD.shape[0], ids.numel(), d.recv_weights_R

    out = world.run(rank_fn)
    assert sum(r for r, _, _ in out) == sum(n for _, n, _ in out)
    assert all(w is None for _, _, w in out)


@given(problems(), st.sampled_from([0.0, 0.3]))
def test_roundtrip_returns_input_times_weight_sum(p, drop_frac):
    world = FakeWorld(p.W)

    def rank_fn(rank):
        x, ids, w = _rank_inputs(p, rank, drop_frac)
        comm = FakeCommunicator(world.group(rank))
        d = comm.dispatch(x, ids, w, num_experts=p.E)
        y = comm.combine(d.recv_x_RD * d.recv_weights_R[:, None], d.handle)  # identity experts
        kept_w = torch.where(ids >= 0, w, 0.0).sum(-1, keepdim=True)
        return y, x * kept_w

    for y, expected in world.run(rank_fn):
        torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)


@given(problems(max_world=3))
def test_autograd_duality(p):
    """dispatch's backward == combine of the upstream gradient; combine's backward == dispatch of it."""
    world = FakeWorld(p.W)

    def rank_fn(rank):
        x, ids, w = _rank_inputs(p, rank)
        comm = FakeCommunicator(world.group(rank))
        x, w = x.requires_grad_(), w.requires_grad_()
        d = comm.dispatch(x, ids, w, num_experts=p.E)
        g_x_R = torch.randn(d.recv_x_RD.shape, generator=p.gen(30 + rank))
        g_w_R = torch.randn(d.recv_weights_R.shape, generator=p.gen(40 + rank))
        torch.autograd.backward([d.recv_x_RD, d.recv_weights_R], [g_x_R, g_w_R])
        expect_gx = comm.combine(g_x_R, d.handle)
        # weight grads return slot by slot: combine a one-hot-in-k embedding of g_w
        k_of_row = d.handle.send_slots_S % p.K
        onehot_SK = torch.nn.functional.one_hot(k_of_row, p.K).float()
        (onehot_RK,) = comm.send([onehot_SK], d.handle)
        expect_gw = comm.combine(onehot_RK * g_w_R[:, None], d.handle)

        y_R = randn(p, d.recv_x_RD.shape[0], p.D, salt=50 + rank).requires_grad_()
        out = comm.combine(y_R, d.handle)
        g_out = torch.randn(out.shape, generator=p.gen(60 + rank))
        out.backward(g_out)
        expect_gy = comm.dispatch(g_out, ids, num_experts=p.E).recv_x_RD
        return x.grad, expect_gx, w.grad, expect_gw, y_R.grad, expect_gy

    for gx, ex, gw, ew, gy, ey in world.run(rank_fn):
        torch.testing.assert_close(gx, ex, rtol=0, atol=0)
        torch.testing.assert_close(gw, ew, rtol=0, atol=0)
        torch.testing.assert_close(gy, ey, rtol=0, atol=0)


def test_loopback_is_expert_major_then_token():
    ids = torch.tensor([[2, 0], [0, 1], [2, 1]])
    x = torch.arange(3.0).view(3, 1)
    d = LoopbackCommunicator().dispatch(x, ids, num_experts=3)
    assert d.recv_x_RD.view(-1).tolist() == [0.0, 1.0, 1.0, 2.0, 0.0, 2.0]
    assert d.recv_counts_e.tolist() == [2, 2, 2]


def test_expert_per_rank_and_empty_rank():
    """E = W (one expert per rank), rank 1 has no tokens, everything routed to expert 0."""
    world = FakeWorld(3)

    def rank_fn(rank):
        T = 0 if rank == 1 else 4
        ids = torch.zeros(T, 1, dtype=torch.long)
        x = torch.randn(T, 2)
        comm = FakeCommunicator(world.group(rank))
        d = comm.dispatch(x, ids, num_experts=3)
        return d.recv_x_RD.shape[0], comm.combine(d.recv_x_RD, d.handle), x

    (r0, y0, x0), (r1, y1, _), (r2, y2, x2) = world.run(rank_fn)
    assert (r0, r1, r2) == (8, 0, 0)
    assert torch.equal(y0, x0) and y1.shape == (0, 2) and torch.equal(y2, x2)


def test_bf16_rows_and_fp32_weights_travel_together_exactly():
    """E = W = 2 and every token picks both experts: each rank receives every token of every source,
    source by source, with the weight of the slot that chose it."""
    world = FakeWorld(2)
    ids = torch.tensor([[0, 1], [1, 0], [1, 0], [0, 1], [1, 0]])

    def rank_fn(rank):
        x = torch.randn(5, 3).to(torch.bfloat16)
        w = torch.rand(5, 2)
        return x, w, FakeCommunicator(world.group(rank)).dispatch(x, ids, w, num_experts=2)

    out = world.run(rank_fn)
    for rank, (_, _, d) in enumerate(out):
        assert d.recv_x_RD.dtype == torch.bfloat16 and d.recv_weights_R.dtype == torch.float32
        assert torch.equal(d.recv_x_RD, torch.cat([x for x, _, _ in out]))
        assert torch.equal(d.recv_weights_R, torch.cat([w[ids == rank] for _, w, _ in out]))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "ids, match",
    [
        (torch.tensor([[0, 4]]), r"topk_ids must lie in \[-1, num_experts=4\)"),
        (torch.tensor([[0, -2]]), r"topk_ids must lie in"),
        (torch.tensor([[0.0, 1.0]]), r"topk_ids must be int32 or int64"),
        (torch.tensor([0, 1]), r"topk_ids must have shape \[T=1, K\]"),
    ],
)
def test_dispatch_rejects_bad_ids(ids, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LoopbackCommunicator().dispatch(torch.randn(1, 3), ids, num_experts=4)


def test_dispatch_rejects_mismatched_weights_and_combine_rows():
    comm = LoopbackCommunicator()
    ids = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="topk_weights must have topk_ids' shape"):
        comm.dispatch(torch.randn(1, 3), ids, torch.rand(1, 3), num_experts=2)
    d = comm.dispatch(torch.randn(1, 3), ids, num_experts=2)
    with pytest.raises(ValueError, match=r"y must have shape \[R=2, D\]"):
        comm.combine(torch.randn(3, 3), d.handle)


def test_experts_not_divisible_by_world_is_an_error():
    world = FakeWorld(2)
    with pytest.raises(ValueError, match="num_experts=3 is not divisible by the EP world size 2"):
        world.run(
            lambda r: FakeCommunicator(world.group(r)).dispatch(
                torch.randn(2, 2), torch.zeros(2, 1, dtype=torch.long), num_experts=3
            )
        )


def test_dispatch_does_not_modify_inputs():
    x, ids, w = torch.randn(4, 3), torch.tensor([[1, 0], [0, -1], [1, 0], [0, 1]]), torch.rand(4, 2)
    copies = [t.clone() for t in (x, ids, w)]
    comm = LoopbackCommunicator()
    d = comm.dispatch(x, ids, w, num_experts=2)
    comm.combine(d.recv_x_RD, d.handle)
    assert all(torch.equal(a, b) for a, b in zip((x, ids, w), copies, strict=True))


# ---------------------------------------------------------------- registry


def test_registry_auto_and_explicit(monkeypatch):
    monkeypatch.delenv("FLASHFUSEMOE_COMM", raising=False)
    assert isinstance(get_communicator(), LoopbackCommunicator)
    world = FakeWorld(2)
    assert isinstance(get_communicator(group=world.group(1)), FakeCommunicator)
    assert get_communicator("fake", world.group(1)).rank == 1
    assert {"loopback", "fake", "nccl"} <= set(available_communicators())


def test_registry_env_var_and_module_class(monkeypatch):
    monkeypatch.setenv("FLASHFUSEMOE_COMM", "flashfusemoe.comm.loopback:LoopbackCommunicator")
    assert isinstance(get_communicator(), LoopbackCommunicator)
    monkeypatch.setenv("FLASHFUSEMOE_COMM", "fake")
    with pytest.raises(TypeError, match="communicator 'fake' needs group=FakeWorld"):
        get_communicator()
    # explicit argument beats the environment
    assert isinstance(get_communicator("loopback"), LoopbackCommunicator)


def test_registry_unknown_name_lists_available(monkeypatch):
    monkeypatch.setenv("FLASHFUSEMOE_COMM", "carrier-pigeon")
    with pytest.raises(ValueError, match=r"communicator 'carrier-pigeon' is unknown; available: \['fake'"):
        get_communicator()
    with pytest.raises(ValueError, match="cannot be loaded"):
        get_communicator("no_such_module_xyz:Comm")


def test_register_user_communicator():
    class Tagged(LoopbackCommunicator):
        pass

    register_communicator("tagged", Tagged)
    assert isinstance(get_communicator("tagged"), Tagged)
    assert "tagged" in available_communicators()
    register_communicator("bogus", lambda group: object())
    with pytest.raises(TypeError, match="not a Communicator"):
        get_communicator("bogus")
    with pytest.raises(ValueError, match="must be non-empty"):
        register_communicator("a:b", Tagged)


def test_nccl_needs_initialized_process_group():
    with pytest.raises(RuntimeError, match="needs torch.distributed initialized"):
        get_communicator("nccl")


def test_communicator_is_abstract():
    with pytest.raises(TypeError):
        Communicator()
