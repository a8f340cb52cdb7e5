"""``torch.autocast`` (flashfusemoe/amp.py): inside an autocast region, ``fused_moe`` / ``MoELayer`` and
the HF experts function give, bit for bit, the result of the same call on operands cast to the autocast
dtype outside it (fp32 weights: the gradients of that call, cast back through the casts); outside
autocast nothing changes; what autocast does not cast (fp64) is refused as before."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flashfusemoe import MoELayer, RouterConfig, fused_moe

D, F, I, E = 12, 16, 8, 4  # noqa: E741


def _operands(seed: int, shared: bool, latent: bool, device="cpu"):
    """fp32 leaves: x, gate, w_up, w_down, (shared_w_up, shared_w_down), (latent_down, latent_up)."""
    g = torch.Generator().manual_seed(seed)
    L = 6 if latent else D
    shapes = {"x": (9, D), "gate": (E, D), "w_up": (E, F, L), "w_down": (E, L, I)}
    if shared:
        shapes |= {"shared_w_up": (F, D), "shared_w_down": (D, I)}
    if latent:
        shapes |= {"latent_down": (L, D), "latent_up": (D, L)}
    return {k: (torch.randn(s, generator=g) / 2).to(device).requires_grad_() for k, s in shapes.items()}


def _forward(ops: dict, backend: str, router: RouterConfig):
    kw = {k: v for k, v in ops.items() if k.startswith(("shared", "latent"))}
    return fused_moe(
        ops["x"], ops["gate"], ops["w_up"], ops["w_down"], router, backend=backend, aux_loss_coeff=0.1,
        z_loss_coeff=0.01, **kw,
    )  # fmt: skip


def _backward(out, losses) -> None:
    """Outside autocast, as torch's docs ask of backward passes."""
    (out.float().square().sum() + losses["aux_loss"] + losses["z_loss"]).backward()


def _check_autocast_equals_cast_call(seed, shared, latent, dtype, backend, device):
    router = RouterConfig(top_k=2)
    ops = _operands(seed, shared, latent, device)
    with torch.autocast(device, dtype=dtype):
        got, got_losses = _forward(ops, backend, router)
    _backward(got, got_losses)
    cast = {k: v.detach().to(dtype).requires_grad_() for k, v in ops.items()}
    want, want_losses = _forward(cast, backend, router)
    _backward(want, want_losses)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for key in ("aux_loss", "z_loss", "tokens_per_expert"):
        torch.testing.assert_close(got_losses[key], want_losses[key], rtol=0, atol=0)
    for k, leaf in ops.items():  # fp32 leaves: the cast call's gradients, cast back
        assert leaf.grad.dtype == torch.float32, k
        torch.testing.assert_close(leaf.grad, cast[k].grad.float(), rtol=0, atol=0, msg=k)


@given(st.integers(0, 2**16), st.booleans(), st.booleans(), st.sampled_from([torch.bfloat16, torch.float16]))
def test_autocast_equals_the_call_on_cast_operands(seed, shared, latent, dtype):
    _check_autocast_equals_cast_call(seed, shared, latent, dtype, "torch", "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_the_gpu_equals_the_call_on_cast_operands(dtype):
    for seed, shared, latent in [(0, False, False), (1, True, False), (2, True, True)]:
        _check_autocast_equals_cast_call(seed, shared, latent, dtype, "triton", "cuda")


def test_layer_under_autocast_keeps_fp32_weights_and_grads():
    torch.manual_seed(0)
    layer = MoELayer(D, F, E, num_shared_experts=1, backend="torch")
    x = torch.randn(2, 5, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = layer(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    for name, p in layer.named_parameters():
        assert p.dtype == p.grad.dtype == torch.float32, name


def test_outside_autocast_or_autocast_off_nothing_is_cast():
    ops = _operands(3, True, False)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        out, _ = _forward(ops, "torch", RouterConfig(top_k=2))
    assert out.dtype == torch.float32


def test_autocast_leaves_fp64_to_the_checks():
    ops = {k: v.detach().double() for k, v in _operands(4, False, False).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="hidden_states"):
        fused_moe(ops["x"], ops["gate"], ops["w_up"], ops["w_down"], backend="torch")


def test_compiled_under_autocast_equals_eager():
    torch.manual_seed(0)
    layer = MoELayer(D, F, E, num_shared_experts=1, backend="torch")
    x = torch.randn(7, D)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, _ = layer(x)
        got, _ = compiled(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
