"""The load-balance loss over a group's global batch (``aux_loss_group``, Qwen's global-batch balance), on
``fake`` ranks: averaged over the ranks it is the batch loss of all their tokens, value and gradient; a
rank without tokens still joins the collective; it needs dropless routing and a group."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flashfusemoe import MoELayer, RouterConfig, fused_moe
from flashfusemoe.comm import FakeWorld


def _weights(D, E, F, seed):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(E, D, generator=g),
        torch.randn(E, F, D, generator=g),
        torch.randn(E, D, F // 2, generator=g),
    )


@given(
    st.integers(1, 4), st.integers(1, 6), st.integers(1, 6), st.data(),
    st.sampled_from(["softmax", "sigmoid"]), st.integers(0, 2**16),
)  # fmt: skip
def test_rank_mean_is_the_global_batch_loss(W, T, E, data, score_func, seed):
    K = data.draw(st.integers(1, E))
    D, F = 5, 6
    gate, w_up, w_down = _weights(D, E, F, seed)
    xs = torch.randn(W, T, D, generator=torch.Generator().manual_seed(seed + 1))
    router = RouterConfig(top_k=K, score_func=score_func)
    world = FakeWorld(W)

    def rank_fn(rank):
        g = gate.clone().requires_grad_()
        _, losses = fused_moe(
            xs[rank], g, w_up, w_down, router, aux_loss_coeff=1.0, aux_loss_group=world.group(rank),
            backend="torch",
        )  # fmt: skip
        (losses["aux_loss"] / W).backward()
        return losses["aux_loss"].detach(), g.grad

    results = world.run(rank_fn)
    ref_gate = gate.clone().requires_grad_()
    _, ref = fused_moe(
        xs.reshape(W * T, D), ref_gate, w_up, w_down, router, aux_loss_coeff=1.0, backend="torch"
    )
    ref["aux_loss"].backward()
    torch.testing.assert_close(torch.stack([loss for loss, _ in results]).mean(), ref["aux_loss"].detach())
    torch.testing.assert_close(sum(grad for _, grad in results), ref_gate.grad, rtol=1e-5, atol=1e-6)


def test_a_rank_without_tokens_joins_and_adds_nothing():
    D, E, F = 4, 3, 6
    gate, w_up, w_down = _weights(D, E, F, 0)
    x0 = torch.randn(5, D)
    world = FakeWorld(2)

    def rank_fn(rank):
        layer = MoELayer(D, F, E, 2, aux_loss_coeff=1.0, aux_loss_group=world.group(rank), backend="torch")
        with torch.no_grad():
            layer.gate_weight.copy_(gate), layer.w_up.copy_(w_up), layer.w_down.copy_(w_down)
        return layer(x0 if rank == 0 else x0[:0])[1]["aux_loss"]

    alone, empty = world.run(rank_fn)
    _, want = fused_moe(x0, gate, w_up, w_down, aux_loss_coeff=1.0, backend="torch")
    torch.testing.assert_close(alone, want["aux_loss"])  # the group's slots are rank 0's
    assert empty.item() == 0.0


def test_group_needs_dropless_routing_and_a_group():
    D, E, F = 4, 3, 6
    gate, w_up, w_down = _weights(D, E, F, 0)
    x = torch.randn(5, D)
    group = FakeWorld(1).group(0)
    capped = RouterConfig(capacity_factor=1.0)
    with pytest.raises(ValueError, match="aux_loss_group with aux_loss_coeff=0.1 needs dropless routing"):
        fused_moe(x, gate, w_up, w_down, capped, aux_loss_coeff=0.1, aux_loss_group=group, backend="torch")
    with pytest.raises(
        TypeError,
        match="aux_loss_group must be a torch.distributed ProcessGroup, a FakeGroup or None, got str",
    ):
        fused_moe(x, gate, w_up, w_down, aux_loss_coeff=0.1, aux_loss_group="world", backend="torch")


def test_triton_backend_gives_the_same_group_loss():
    """The triton router's counts (its kept slots, int64) feed the same collective as the reference's."""
    W, T, D, E, F = 3, 5, 4, 6, 8
    gate, w_up, w_down = _weights(D, E, F, 2)
    xs = torch.randn(W, T, D, generator=torch.Generator().manual_seed(3))
    world = FakeWorld(W)

    def rank_fn(rank):
        return [
            fused_moe(
                xs[rank], gate, w_up, w_down, aux_loss_coeff=1.0, aux_loss_group=world.group(rank), backend=b
            )[1]["aux_loss"]
            for b in ("torch", "triton")
        ]

    for ref, tri in world.run(rank_fn):
        torch.testing.assert_close(tri, ref, rtol=1e-5, atol=1e-6)
