"""integration/lm_loss.py: the chunked LM-head cross-entropy equals cross_entropy over the full fp32 logits
in value and in both gradients, for chunk sizes that do and do not divide T; bf16 on GPU under the
tolerance rule; bad shapes are refused by name."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from integration.lm_loss import lm_head_cross_entropy


def _reference(x_TD, w_VD, targets_T, scale):
    loss = F.cross_entropy((x_TD @ w_VD.t()).float(), targets_T)
    return (loss, *torch.autograd.grad(scale * loss, (x_TD, w_VD)))


def _ours(x_TD, w_VD, targets_T, scale, chunk):
    loss = lm_head_cross_entropy(x_TD, w_VD, targets_T, chunk)
    return (loss, *torch.autograd.grad(scale * loss, (x_TD, w_VD)))


def _inputs(T, D, V, seed, dtype, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) / D**0.5).to(device, dtype).requires_grad_()
    return x, w, torch.randint(0, V, (T,), generator=g).to(device)


@given(
    T=st.integers(1, 70), D=st.integers(1, 24), V=st.integers(2, 90), chunk=st.integers(1, 80),
    scale=st.sampled_from([1.0, -2.5]), seed=st.integers(0, 2**31),
)  # fmt: skip
def test_equals_full_logits_cross_entropy_fp32(T, D, V, chunk, scale, seed):
    x, w, targets = _inputs(T, D, V, seed, torch.float32)
    for got, want in zip(_ours(x, w, targets, scale, chunk), _reference(x, w, targets, scale), strict=True):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)


def test_without_gradients_only_the_loss_is_computed():
    x, w, targets = _inputs(37, 8, 11, 5, torch.float32)
    want = F.cross_entropy(x @ w.t(), targets)
    with torch.no_grad():
        torch.testing.assert_close(lm_head_cross_entropy(x, w, targets, 16), want)
    torch.testing.assert_close(lm_head_cross_entropy(x.detach(), w.detach(), targets, 16), want.detach())
    assert lm_head_cross_entropy(x[:0].detach(), w.detach(), targets[:0]).item() == 0


def test_no_tokens_is_zero_with_zero_gradients():
    x, w, targets = _inputs(0, 8, 11, 0, torch.float32)
    loss, gx, gw = _ours(x, w, targets, 1.0, 4)
    assert loss.item() == 0 and gx.shape == (0, 8) and not gw.any()


@pytest.mark.gpu
def test_bf16_on_gpu_within_twice_torch_error():
    x, w, targets = _inputs(5000, 1024, 32000, 1, torch.bfloat16, "cuda")
    exact = _reference(
        x.double().detach().requires_grad_(), w.double().detach().requires_grad_(), targets, 1.0
    )
    torch_bf16 = _reference(x, w, targets, 1.0)
    ours = _ours(x, w, targets, 1.0, 2048)
    for name, o, t, e in zip(("loss", "grad_x", "grad_w"), ours, torch_bf16, exact, strict=True):
        bound = 2 * (t.double() - e).abs().max().item() + 1e-6 * e.abs().max().item()
        assert (o.double() - e).abs().max().item() <= bound, name


def test_bad_shapes_are_refused_by_name():
    x, w, targets = _inputs(6, 8, 11, 0, torch.float32)
    with pytest.raises(ValueError, match="w"):
        lm_head_cross_entropy(x, w[:, :4], targets)
    with pytest.raises(ValueError, match="targets"):
        lm_head_cross_entropy(x, w, targets[:3])
    for chunk, error in ((0, ValueError), (-2, ValueError), (2.0, TypeError)):
        with pytest.raises(error, match=rf"chunk={chunk} must be an int in \[1, inf\]"):
            lm_head_cross_entropy(x, w, targets, chunk)
