"""Every communicator against one routing semantics (the loopback normal form), on simulated ranks.

``fake`` (default and sync-free) is checked against ``loopback`` for the normal form, the roundtrip,
row counts and the autograd duality; the real-process transports run the same checks in
tests/comm/test_gloo.py.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flashfusemoe.comm import (
    AllToAllHandle,
    Communicator,
    FakeCommunicator,
    FakeWorld,
    LoopbackCommunicator,
    available_communicators,
    get_communicator,
    register_communicator,
)
from flashfusemoe.comm.alltoall import dispatch_bytes
from flashfusemoe.comm.testing import expected_normal_form, normal_form
from tests.strategies import Problem, ep_problems, randn, rank_tokens, topk_ids


def _rank_inputs(p: Problem, rank: int, drop_frac: float = 0.0, same_tokens: bool = False):
    """Rank ``rank``'s tokens, ids and weights; ``same_tokens``: T on every rank (sync-free mode)."""
    T = p.T if same_tokens else rank_tokens(p, rank)
    ids = topk_ids(p, T=T, salt=rank, drop_frac=drop_frac)
    x = randn(p, T, p.D, salt=10 + rank)
    w = torch.rand(T, p.K, generator=p.gen(20 + rank))
    return x, ids, w


def _fake(world, rank, sync_free):
    return FakeCommunicator(world.group(rank), sync_free=sync_free)


@given(ep_problems(), st.sampled_from([0.0, 0.25]), st.booleans())
def test_fake_normal_form_equals_loopback_bit_exact(p, drop_frac, sync_free):
    """Rank r receives exactly the loopback slots of its experts over all sources, every row with at
    least one local id (sync-free: plus padding rows of none), one row per (token, destination)."""
    world = FakeWorld(p.W)
    inputs = [_rank_inputs(p, r, drop_frac, sync_free) for r in range(p.W)]

    def rank_fn(rank):
        return _fake(world, rank, sync_free).dispatch(*inputs[rank], num_experts=p.E)

    e = p.E // p.W
    for rank, d in enumerate(world.run(rank_fn)):
        assert normal_form(d, rank=rank, world_size=p.W, num_experts=p.E) == expected_normal_form(
            inputs, rank, p.W, p.E
        )
        local = d.recv_topk_ids_RK >= 0
        assert bool(((d.recv_topk_ids_RK >= -1) & (d.recv_topk_ids_RK < e)).all())
        assert bool((d.recv_topk_weights_RK[~local] == 0).all())
        assert d.recv_topk_ids_RK.dtype == inputs[rank][1].dtype
        if sync_free:
            assert d.recv_x_RD.shape[0] == sum(x.shape[0] for x, _, _ in inputs)
            assert d.num_recv_slots == d.recv_x_RD.shape[0] * p.K
        else:
            assert bool(local.any(1).all())
            pairs = sum(
                int(((ids >= rank * e) & (ids < (rank + 1) * e)).any(1).sum()) for _, ids, _ in inputs
            )
            assert d.recv_x_RD.shape[0] == pairs
            assert d.num_recv_slots == int(local.sum())


@given(ep_problems(), st.sampled_from([0.0, 0.3]), st.booleans())
def test_roundtrip_with_identity_experts_returns_input(p, drop_frac, sync_free):
    """dispatch -> identity experts (a row times its local weights' sum) -> combine, with weights 1/K:
    the input itself (times the kept fraction where slots were dropped)."""
    world = FakeWorld(p.W)

    def rank_fn(rank):
        x, ids, _ = _rank_inputs(p, rank, drop_frac, sync_free)
        w = torch.full(ids.shape, 1.0 / p.K)
        comm = _fake(world, rank, sync_free)
        d = comm.dispatch(x, ids, w, num_experts=p.E)
        y = comm.combine(d.recv_x_RD * d.recv_topk_weights_RK.sum(1, keepdim=True), d.handle)
        return y, x * ((ids >= 0).sum(1, keepdim=True) / p.K)

    for y, expected in world.run(rank_fn):
        torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)


@given(ep_problems(max_world=3, max_local=4), st.booleans())
def test_autograd_duality(p, sync_free):
    """dispatch's backward == combine of the row gradients and, per slot, the weight gradient of the
    rank that holds its expert; combine's backward == dispatch of the output gradient."""
    world = FakeWorld(p.W)

    def rank_fn(rank):
        x, ids, w = _rank_inputs(p, rank, 0.2, sync_free)
        comm = _fake(world, rank, sync_free)
        x, w = x.requires_grad_(), w.requires_grad_()
        d = comm.dispatch(x, ids, w, num_experts=p.E)
        g_x = torch.randn(d.recv_x_RD.shape, generator=p.gen(30 + rank))
        g_w = torch.randn(d.recv_topk_weights_RK.shape, generator=p.gen(40 + rank))
        g_w = torch.where(d.recv_topk_ids_RK >= 0, g_w, 0.0)  # what experts give non-local slots
        torch.autograd.backward([d.recv_x_RD, d.recv_topk_weights_RK], [g_x, g_w])
        expect_gx = comm.combine(g_x, d.handle)
        # each slot's weight gradient travels back with its row: combine a one-hot-in-k embedding
        expect_gw = torch.stack([comm.combine(g_w[:, k : k + 1], d.handle)[:, 0] for k in range(p.K)], dim=1)
        y = randn(p, d.recv_x_RD.shape[0], p.D, salt=50 + rank).requires_grad_()
        out = comm.combine(y, d.handle)
        g_out = torch.randn(out.shape, generator=p.gen(60 + rank))
        out.backward(g_out)
        expect_gy = comm.dispatch(g_out, ids, w.detach(), num_experts=p.E).recv_x_RD
        return x.grad, expect_gx, w.grad, expect_gw, y.grad, expect_gy

    for gx, ex, gw, ew, gy, ey in world.run(rank_fn):
        torch.testing.assert_close(gx, ex, rtol=0, atol=0)
        torch.testing.assert_close(gw, ew, rtol=0, atol=0)
        torch.testing.assert_close(gy, ey, rtol=0, atol=0)


def test_loopback_is_zero_copy():
    """The very tensors come back: the EP = 1 path is the single-GPU path."""
    comm = LoopbackCommunicator()
    x, ids, w = torch.randn(3, 4), torch.tensor([[2, 0], [0, -1], [1, 2]]), torch.rand(3, 2)
    d = comm.dispatch(x, ids, w, num_experts=3)
    assert d.recv_x_RD is x and d.recv_topk_ids_RK is ids and d.recv_topk_weights_RK is w
    assert d.num_recv_slots == 6
    y = torch.randn(3, 4)
    assert comm.combine(y, d.handle) is y


def test_one_expert_per_rank_empty_rank_and_all_to_one_expert():
    """E = W = K = 3, rank 1 has no tokens; then every slot to expert 0 (K = 1)."""
    world = FakeWorld(3)

    def rank_fn(rank):
        T = 0 if rank == 1 else 4
        comm = FakeCommunicator(world.group(rank))
        ids = torch.tensor([0, 1, 2]).repeat(T, 1)
        x = torch.randn(T, 2)
        d = comm.dispatch(x, ids, torch.full((T, 3), 0.5), num_experts=3)
        y = comm.combine(d.recv_x_RD * d.recv_topk_weights_RK.sum(1, keepdim=True), d.handle)
        d1 = comm.dispatch(x, torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1), num_experts=3)
        return d.recv_x_RD.shape[0], y, x, d1.recv_x_RD.shape[0], comm.combine(d1.recv_x_RD, d1.handle)

    out = world.run(rank_fn)
    assert [r for r, *_ in out] == [8, 8, 8] and [r1 for *_, r1, _ in out] == [8, 0, 0]
    for _, y, x, _, y1 in out:
        torch.testing.assert_close(y, 1.5 * x, rtol=1e-6, atol=1e-6)
        assert torch.equal(y1, x)


def test_bf16_rows_and_fp32_weights_travel_together_exactly():
    world = FakeWorld(2)
    ids = torch.tensor([[0, 1], [1, 0], [1, 0], [0, 1], [1, 0]])

    def rank_fn(rank):
        x = torch.randn(5, 3).to(torch.bfloat16)
        w = torch.rand(5, 2)
        return x, w, FakeCommunicator(world.group(rank)).dispatch(x, ids, w, num_experts=2)

    out = world.run(rank_fn)
    for rank, (_, _, d) in enumerate(out):
        assert d.recv_x_RD.dtype == torch.bfloat16 and d.recv_topk_weights_RK.dtype == torch.float32
        assert torch.equal(d.recv_x_RD, torch.cat([x for x, _, _ in out]))  # source rank, then token
        assert torch.equal(
            d.recv_topk_weights_RK, torch.cat([torch.where(ids == rank, w, 0) for _, w, _ in out])
        )
        assert torch.equal(d.recv_topk_ids_RK, torch.where(ids == rank, 0, -1).repeat(2, 1))


def test_sync_free_dispatch_combine_and_backward_read_nothing_on_the_host(monkeypatch):
    """No counts copy, no .item() / .tolist(): what makes the mode capturable in a CUDA graph."""
    import flashfusemoe.comm.alltoall as alltoall

    world = FakeWorld(2)

    def refuse(*args, **kwargs):
        raise AssertionError("host read in sync-free mode")

    def rank_fn(rank):
        x = torch.randn(5, 3, requires_grad=True)
        w = torch.rand(5, 2, requires_grad=True)
        comm = FakeCommunicator(world.group(rank), sync_free=True)
        d = comm.dispatch(x, torch.tensor([[0, 3], [1, 2], [2, 3], [0, 1], [3, -1]]), w, num_experts=4)
        y = comm.combine(d.recv_x_RD * d.recv_topk_weights_RK.sum(1, keepdim=True), d.handle)
        y.sum().backward()
        return x.grad.shape

    monkeypatch.setattr(alltoall, "_host_read", refuse)
    monkeypatch.setattr(torch.Tensor, "item", refuse)
    monkeypatch.setattr(torch.Tensor, "tolist", refuse)
    assert world.run(rank_fn) == [(5, 3)] * 2


def test_communicators_keep_no_per_call_state():
    world = FakeWorld(2)

    def rank_fn(rank):
        comm = FakeCommunicator(world.group(rank))
        before = dict(vars(comm))
        d = comm.dispatch(torch.randn(4, 3), torch.tensor([[0, 1]] * 4), torch.rand(4, 2), num_experts=2)
        comm.combine(d.recv_x_RD, d.handle)
        return before == vars(comm), isinstance(d.handle, AllToAllHandle)

    assert world.run(rank_fn) == [(True, True)] * 2


def test_dispatch_bytes_per_token_rank_pair_vs_per_slot():
    """A token that picks two experts of one rank sends one row there, not two."""
    ids = torch.tensor([[0, 1], [0, 2], [3, -1]])  # E = 4, W = 2: experts {0, 1} on rank 0
    assert dispatch_bytes(ids, 4, 2, row_bytes=10, per_slot=True) == 50
    assert dispatch_bytes(ids, 4, 2, row_bytes=10) == 40  # (0,r0) (1,r0) (1,r1) (2,r1)
    assert dispatch_bytes(ids, 4, 2, row_bytes=10, rank=0) == 20  # to rank 1 only
    assert dispatch_bytes(ids, 4, 2, row_bytes=10, rank=0, per_slot=True) == 20


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("sync_free", [False, True])
def test_all_to_all_dispatch_rejects_out_of_range_ids_on_every_rank(sync_free):
    """Only rank 1 passes a bad id; every rank raises (none is left waiting in an exchange)."""
    world = FakeWorld(2)
    raised = []

    def rank_fn(rank):
        ids = torch.tensor([[0, 4 if rank == 1 else 1], [2, -2 if rank == 1 else -1]])
        try:
            FakeCommunicator(world.group(rank), sync_free=sync_free).dispatch(
                torch.randn(2, 3), ids, torch.rand(2, 2), num_experts=4
            )
        except (ValueError, RuntimeError) as exc:
            raised.append((rank, str(exc)))

    world.run(rank_fn)
    assert sorted(r for r, _ in raised) == [0, 1]
    if sync_free:  # CPU: torch._assert_async raises at once (on CUDA: a device-side assert)
        assert all("topk_ids must lie in [-1, num_experts=4)" in m for r, m in raised if r == 1)
    else:
        for rank, msg in raised:
            assert "rank(s) [1] passed ids outside it" in msg
            assert ("here [-2, 4]" in msg) == (rank == 1)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        (dict(ids=torch.tensor([[0.0, 1.0]])), TypeError, "topk_ids must be int32 or int64"),
        (dict(ids=torch.tensor([0, 1])), ValueError, r"topk_ids must have shape \[T=1, K\]"),
        (dict(w=torch.rand(1, 3)), ValueError, r"topk_weights must be a tensor of topk_ids' shape \(1, 2\)"),
        (dict(w=torch.ones(1, 2, dtype=torch.long)), TypeError, "topk_weights must be a floating tensor"),
        (dict(x=torch.randn(1, 2, 3)), ValueError, r"x must have shape \[T, D\]"),
        (dict(E=0), ValueError, "num_experts=0 must be a positive int"),
        (dict(x=torch.randn(1, 3, device="meta")), ValueError, "topk_ids is on cpu, x on meta"),
    ],
)
def test_dispatch_rejects_bad_arguments(args, exc, match):
    x, ids, w, E = (
        args.get("x", torch.randn(1, 3)),
        args.get("ids", torch.tensor([[0, 1]])),
        args.get("w", torch.rand(1, 2)),
        args.get("E", 2),
    )
    with pytest.raises(exc, match=match):
        LoopbackCommunicator().dispatch(x, ids, w, num_experts=E)


def test_combine_rejects_wrong_rows_and_foreign_handles():
    comm = LoopbackCommunicator()
    d = comm.dispatch(torch.randn(2, 3), torch.tensor([[0, 1], [1, 0]]), torch.rand(2, 2), num_experts=2)
    with pytest.raises(ValueError, match=r"y must have shape \[R=2, D\]"):
        comm.combine(torch.randn(3, 3), d.handle)
    world = FakeWorld(1)
    with pytest.raises(
        TypeError, match=r"handle must come from this communicator's dispatch \(AllToAllHandle\)"
    ):
        world.run(lambda r: FakeCommunicator(world.group(r)).combine(torch.randn(2, 3), d.handle))
    with pytest.raises(TypeError, match=r"\(LoopbackHandle\), got AllToAllHandle"):
        d2 = world.run(
            lambda r: FakeCommunicator(world.group(r)).dispatch(
                torch.randn(2, 3), torch.tensor([[0], [0]]), torch.ones(2, 1), num_experts=1
            )
        )[0]
        comm.combine(d2.recv_x_RD, d2.handle)


def test_experts_not_divisible_by_world_is_an_error():
    world = FakeWorld(2)
    with pytest.raises(ValueError, match="num_experts=3 is not divisible by the EP world size 2"):
        world.run(
            lambda r: FakeCommunicator(world.group(r)).dispatch(
                torch.randn(2, 2), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), num_experts=3
            )
        )


def test_dispatch_and_combine_do_not_modify_inputs():
    world = FakeWorld(2)

    def rank_fn(rank):
        x, ids, w = torch.randn(4, 3), torch.tensor([[1, 0], [0, -1], [1, 0], [0, 1]]), torch.rand(4, 2)
        copies = [t.clone() for t in (x, ids, w)]
        comm = FakeCommunicator(world.group(rank))
        d = comm.dispatch(x, ids, w, num_experts=2)
        y = d.recv_x_RD.clone()
        comm.combine(y, d.handle)
        return all(torch.equal(a, b) for a, b in zip((x, ids, w), copies, strict=True)) and torch.equal(
            y, d.recv_x_RD
        )

    assert world.run(rank_fn) == [True, True]


# ---------------------------------------------------------------- FakeWorld misuse


def test_fake_group_rank_must_lie_in_world():
    world = FakeWorld(2)
    for bad in (2, -1, True, 0.5):
        with pytest.raises(ValueError, match=r"must be an int in \[0, world_size=2\)"):
            world.group(bad)
    with pytest.raises(ValueError, match="world_size=0 must be an int >= 1"):
        FakeWorld(0)


def _one_dispatch(world, rank):
    comm = FakeCommunicator(world.group(rank))
    return comm.dispatch(torch.randn(2, 3), torch.tensor([[0], [1]]), torch.ones(2, 1), num_experts=6)


def test_fake_communicator_outside_run_is_a_clear_error():
    world = FakeWorld(2)
    with pytest.raises(RuntimeError, match="rank 0 called 'dispatch counts' outside FakeWorld.run"):
        _one_dispatch(world, 0)


def test_rank_that_skips_a_collective_is_named_at_once():
    world = FakeWorld(3, timeout_s=600)
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[2\] returned from fn without joining exchange #0 "):
        world.run(lambda r: None if r == 2 else _one_dispatch(world, r))


def test_ranks_in_different_collectives_are_named():
    world = FakeWorld(2, timeout_s=600)

    def rank_fn(rank):
        comm = FakeCommunicator(world.group(rank), sync_free=rank == 1)  # rank 1 skips the counts exchange
        comm.dispatch(torch.randn(2, 3), torch.tensor([[0], [1]]), torch.ones(2, 1), num_experts=2)

    with pytest.raises(RuntimeError, match="entered .* as exchange #0, where other ranks are in"):
        world.run(rank_fn)


def test_failing_rank_is_reported_not_its_waiting_peers():
    world = FakeWorld(2, timeout_s=600)

    def rank_fn(rank):
        if rank == 1:
            raise KeyError("boom")
        return _one_dispatch(world, rank)

    with pytest.raises(KeyError, match="boom"):
        world.run(rank_fn)


def test_fake_refuses_non_cpu_tensors():
    world = FakeWorld(1)

    def rank_fn(rank):
        x = torch.randn(2, 3, device="meta")
        ids = torch.zeros(2, 1, dtype=torch.long, device="meta")
        FakeCommunicator(world.group(rank)).dispatch(x, ids, torch.ones(2, 1, device="meta"), num_experts=1)

    with pytest.raises(ValueError, match="communicator 'fake' moves CPU tensors only, got meta"):
        world.run(rank_fn)


# ---------------------------------------------------------------- registry


def test_registry_auto_and_explicit(monkeypatch):
    monkeypatch.delenv("FLASHFUSEMOE_COMM", raising=False)
    assert isinstance(get_communicator(), LoopbackCommunicator)
    world = FakeWorld(2)
    assert isinstance(get_communicator(group=world.group(1)), FakeCommunicator)
    assert get_communicator("fake", world.group(1)).rank == 1
    comm = FakeCommunicator(world.group(0), sync_free=True)
    assert get_communicator(comm, world.group(0)) is comm
    assert {"loopback", "fake", "nccl"} <= set(available_communicators())


def test_registry_refuses_a_communicator_that_does_not_span_the_group(monkeypatch):
    world = FakeWorld(2)
    with pytest.raises(ValueError, match="LoopbackCommunicator spans 1 rank.* the EP group has 2"):
        get_communicator("loopback", world.group(0))
    monkeypatch.setenv("FLASHFUSEMOE_COMM", "loopback")
    with pytest.raises(ValueError, match="spans 1 rank"):
        get_communicator(None, world.group(0))
    with pytest.raises(
        TypeError, match="ep_group must be a torch.distributed ProcessGroup, a FakeGroup or None"
    ):
        get_communicator("loopback", "not a group")


def test_registry_env_var_and_module_class(monkeypatch):
    monkeypatch.setenv("FLASHFUSEMOE_COMM", "flashfusemoe.comm.loopback:LoopbackCommunicator")
    assert isinstance(get_communicator(), LoopbackCommunicator)
    monkeypatch.setenv("FLASHFUSEMOE_COMM", "fake")
    with pytest.raises(TypeError, match="communicator 'fake' needs group=FakeWorld"):
        get_communicator()
    assert isinstance(get_communicator("loopback"), LoopbackCommunicator)  # the argument beats the env


def test_registry_unknown_name_lists_available(monkeypatch):
    monkeypatch.setenv("FLASHFUSEMOE_COMM", "carrier-pigeon")
    unknown = r"communicator 'carrier-pigeon' is unknown; available: \['deepep', 'fake'"
    with pytest.raises(ValueError, match=unknown):
        get_communicator()
    with pytest.raises(ValueError, match="cannot be loaded"):
        get_communicator("no_such_module_xyz:Comm")


def test_register_user_communicator_and_bad_registrations():
    class Tagged(LoopbackCommunicator):
        pass

    register_communicator("tagged", Tagged)
    assert isinstance(get_communicator("tagged"), Tagged)
    assert "tagged" in available_communicators()
    register_communicator("bogus", lambda group: object())
    with pytest.raises(TypeError, match="not a Communicator"):
        get_communicator("bogus")
    for bad in ("a:b", "", 3):
        with pytest.raises(ValueError, match="must be a non-empty str without ':'"):
            register_communicator(bad, Tagged)
    with pytest.raises(TypeError, match="factory must be callable"):
        register_communicator("x", "not callable")
    with pytest.raises(TypeError, match="communicator must be a name, a Communicator or None, got int"):
        get_communicator(3)


def test_nccl_needs_initialized_process_group():
    with pytest.raises(RuntimeError, match="needs torch.distributed initialized"):
        get_communicator("nccl")


def test_communicator_is_abstract():
    with pytest.raises(TypeError):
        Communicator()


def test_deepep_without_deep_ep_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "deep_ep", None)  # an import of it raises ImportError
    with pytest.raises(ImportError, match=r"communicator 'deepep' needs DeepEP .*tokenspeed-deepep==1.2.1"):
        get_communicator("deepep")


@pytest.mark.parametrize("sync_free", [False, True])
def test_nccl_communicator_of_one_rank_is_loopback(sync_free):
    """A group of one moves nothing: the very tensors come back, as from loopback (EP = 1 through
    ``nccl`` costs what the single-GPU layer costs)."""
    import torch.distributed as dist

    from flashfusemoe.comm import NcclCommunicator

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        comm = NcclCommunicator(sync_free=sync_free)
        x, ids, w = torch.randn(5, 3), torch.randint(0, 4, (5, 2)), torch.rand(5, 2)
        d = comm.dispatch(x, ids, w, num_experts=4)
        assert d.recv_x_RD is x and d.recv_topk_ids_RK is ids and d.recv_topk_weights_RK is w
        y = torch.randn(5, 3)
        assert comm.combine(y, d.handle) is y
        with pytest.raises(TypeError, match="handle must come from this communicator's dispatch"):
            comm.combine(y, object())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sync_free", [False, True])
def test_self_all_to_all_layer_is_bit_identical_to_loopback(sync_free):
    """The all-to-all bookkeeping alone (comm.testing.SelfAllToAll, bench_ep's W = 1 row): the same
    numbers as loopback (x's gradient up to the order autograd adds its three parts in)."""
    import copy

    from flashfusemoe import MoELayer
    from flashfusemoe.comm.testing import SelfAllToAll

    torch.manual_seed(3)
    ref = MoELayer(6, 8, 4, 2, num_shared_experts=1)
    ep = copy.deepcopy(ref).shard_experts(None, communicator=SelfAllToAll(sync_free))
    x = torch.randn(11, 6)
    runs = []
    for layer in (ref, ep):
        xx = x.clone().requires_grad_()
        out, _ = layer(xx)
        out.backward(torch.ones_like(out))
        runs.append([out, xx.grad] + [p.grad for p in layer.parameters()])
    for got, want in zip(*runs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
