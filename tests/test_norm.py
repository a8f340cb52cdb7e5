"""integration/norm.py: the residual add + RMSNorm with the Triton backward against autograd through the
same formula and against ``nn.RMSNorm`` (the interpreter on CPU, fp32; on a GPU also bf16), and its
backward op under ``torch.library.opcheck``."""

import pytest
import torch

from integration.norm import add_rms_norm

_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# rows not a multiple of the program's 4, a D not a power of two, one row, more rows than programs x 4
_SHAPES = [(7, 5), (1, 33), (4, 16), (1061, 8)]


def _grads(outs, inputs, cots):
    return torch.autograd.grad(outs, inputs, cots)


@pytest.mark.parametrize("T, D", _SHAPES)
@pytest.mark.parametrize("with_r", [True, False])
def test_add_rms_norm_kernel_matches_autograd_of_the_formula(T, D, with_r):
    g = torch.Generator().manual_seed(T * 31 + D)
    x, r = (torch.randn(2, T, D, generator=g).to(_DEVICE).requires_grad_() for _ in range(2))
    w = (1 + torch.randn(D, generator=g)).to(_DEVICE).requires_grad_()
    before = [t.detach().clone() for t in (x, r, w)]
    rr = r if with_r else None
    inputs = (x, r, w) if with_r else (x, w)
    h, y = add_rms_norm(x, rr, w, kernel=True)
    h_ref, y_ref = add_rms_norm(x, rr, w, kernel=False)
    assert torch.equal(h, h_ref) and torch.equal(y, y_ref)  # the same forward
    torch.testing.assert_close(y, torch.nn.RMSNorm(D).to(_DEVICE)(h_ref) * w, rtol=1e-5, atol=1e-5)
    cots = [torch.randn(2, T, D, generator=g).to(_DEVICE) for _ in range(2)]
    # h feeds the residual path too: its gradient is added in the same pass
    got = _grads((h, y), inputs, cots)
    ref = _grads((h_ref, y_ref), inputs, cots)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(t.detach(), b) for t, b in zip((x, r, w), before, strict=True))


def test_add_rms_norm_without_a_residual_gradient_a_strided_x_and_empty_rows():
    x = torch.randn(5, 6, device=_DEVICE, requires_grad=True)
    r = torch.randn(5, 6, device=_DEVICE, requires_grad=True)
    w = torch.randn(6, device=_DEVICE, requires_grad=True)
    cot = torch.randn(5, 6, device=_DEVICE)
    _, y = add_rms_norm(x, r, w, kernel=True)  # h unused: its gradient comes as zeros
    _, y_ref = add_rms_norm(x, r, w, kernel=False)
    for a, b in zip(_grads(y, (x, r, w), cot), _grads(y_ref, (x, r, w), cot), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    wide = torch.randn(5, 12, device=_DEVICE, requires_grad=True)  # rows 12 apart: a strided x
    _, yk = add_rms_norm(wide[:, :6], None, w, kernel=True)
    _, yr = add_rms_norm(wide[:, :6], None, w, kernel=False)
    for a, b in zip(_grads(yk, (wide, w), cot), _grads(yr, (wide, w), cot), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    e = torch.zeros(0, 6, device=_DEVICE, requires_grad=True)
    h, y = add_rms_norm(e, e.detach(), w, kernel=True)
    (gw,) = torch.autograd.grad(y.sum() + h.sum(), w, allow_unused=True)
    assert y.shape == (0, 6) and torch.equal(gw, torch.zeros_like(w))


@pytest.mark.gpu  # 16-bit: the interpreter rounds toward zero
def test_add_rms_norm_bf16_within_the_tolerance_rule():
    T, D = 4096, 1024
    x, r, cot = (torch.randn(T, D, device="cuda") for _ in range(3))
    w = 1 + 0.1 * torch.randn(D, device="cuda")
    lo = [t.bfloat16().requires_grad_() for t in (x, r, w)]
    f32 = [t.bfloat16().float().requires_grad_() for t in (x, r, w)]
    errs = {}
    for name, ins, kernel in (("ours", lo, True), ("torch bf16", lo, False), ("fp32", f32, False)):
        h, y = add_rms_norm(*ins, eps=torch.finfo(torch.bfloat16).eps, kernel=kernel)
        errs[name] = [y.float(), *(g.float() for g in torch.autograd.grad(y, ins, cot.to(y.dtype)))]
    for i, ref in enumerate(errs["fp32"]):
        err = (errs["ours"][i] - ref).norm() / ref.norm()
        err16 = (errs["torch bf16"][i] - ref).norm() / ref.norm()
        assert err <= 2 * err16 + 1e-3, (i, err, err16)


def test_add_rms_norm_refuses_mismatched_inputs():
    w = torch.ones(4)
    with pytest.raises(ValueError, match=r"weight \[D\]"):
        add_rms_norm(torch.zeros(2, 4), None, torch.ones(5))
    with pytest.raises(ValueError, match=r"r of its shape and dtype"):
        add_rms_norm(torch.zeros(2, 4), torch.zeros(3, 4), w)
    with pytest.raises(ValueError, match=r"r of its shape and dtype"):
        add_rms_norm(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.float64), w)


def test_norm_backward_op_passes_opcheck():
    T, D = 9, 6
    dy, h, dh = (torch.randn(T, D, device=_DEVICE) for _ in range(3))
    rstd, w = torch.rand(T, device=_DEVICE) + 0.5, torch.randn(D, device=_DEVICE)
    for extra in (dh, None):
        op = torch.ops.flashfusemoe.lm_rms_norm_bwd.default
        result = torch.library.opcheck(op, (dy, h, rstd, w, extra))
        assert all(v == "SUCCESS" for v in result.values()), result
