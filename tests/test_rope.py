"""integration/rope.py: the rotary embedding kernels of the LM example against the plain-torch formula
(the Triton interpreter on CPU, fp32; on a GPU also bf16), gradients included, and their custom ops
under ``torch.library.opcheck``."""

import pytest
import torch

from integration.rope import rope_qkv, rope_reference, rope_table

_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (B, S, H, d): one block of positions and a partial one, heads and frequencies not powers of two
_SHAPES = [(2, 5, 3, 6), (1, 9, 4, 16), (3, 1, 1, 2)]


def _reference(qkv_BS3Hd, table):
    q, k, v = qkv_BS3Hd.unbind(2)
    return rope_reference(q, table), rope_reference(k, table), v


@pytest.mark.parametrize("B, S, H, d", _SHAPES)
def test_rope_kernels_match_the_formula_forward_and_backward(B, S, H, d):
    g = torch.Generator().manual_seed(B * 100 + S)
    table = rope_table(S + 3, d).to(_DEVICE)  # more positions than the sequence
    qkv = torch.randn(B, S, 3, H, d, generator=g).to(_DEVICE).requires_grad_()
    before = qkv.detach().clone()
    cots = [torch.randn(B, S, H, d, generator=g).to(_DEVICE) for _ in range(3)]
    outs = rope_qkv(qkv, table, kernel=True)
    refs = _reference(qkv, table)
    for out, ref in zip(outs, refs, strict=True):
        assert out.shape == (B, S, H, d) and out.is_contiguous()
        assert out.untyped_storage().data_ptr() != qkv.untyped_storage().data_ptr()
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)
    assert torch.equal(outs[2], qkv[:, :, 2])  # v: a copy, bit for bit
    (grad,) = torch.autograd.grad(outs, qkv, cots)
    (grad_ref,) = torch.autograd.grad(refs, qkv, cots)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=2e-6)
    assert torch.equal(grad[:, :, 2], cots[2])
    assert torch.equal(qkv.detach(), before)  # the input is not modified


def test_rope_backward_reads_strided_gradients_and_unused_outputs():
    """Attention hands the gradients back in its own layout ([B, H, S, d] memory here), and an unused
    output's gradient comes as None."""
    B, S, H, d = 2, 6, 4, 8
    table = rope_table(S, d).to(_DEVICE)
    qkv = torch.randn(B, S, 3, H, d, device=_DEVICE, requires_grad=True)
    q, k, v = rope_qkv(qkv, table, kernel=True)
    qr, kr, _ = _reference(qkv, table)
    cot_BHSd = torch.randn(B, H, S, d, device=_DEVICE)
    loss = (q.transpose(1, 2) * cot_BHSd).sum() + (k.transpose(1, 2) * cot_BHSd).sum()
    loss_ref = (qr.transpose(1, 2) * cot_BHSd).sum() + (kr.transpose(1, 2) * cot_BHSd).sum()
    (grad,) = torch.autograd.grad(loss, qkv)
    (grad_ref,) = torch.autograd.grad(loss_ref, qkv)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=2e-6)
    assert not grad[:, :, 2].any()  # v unused: no gradient


@pytest.mark.gpu  # 16-bit: the interpreter rounds toward zero
def test_rope_kernels_in_bf16_within_the_tolerance_rule():
    B, S, H, d = 4, 256, 16, 64
    table = rope_table(S, d).cuda()
    qkv32 = torch.randn(B, S, 3, H, d, device="cuda")
    qkv = qkv32.bfloat16()
    out = rope_qkv(qkv, table.bfloat16())
    ref32 = _reference(qkv.float(), table.bfloat16().float())  # fp32 from the same stored values
    ref16 = _reference(qkv, table.bfloat16())  # plain torch in bf16: each op rounded
    for o, r32, r16 in zip(out, ref32, ref16, strict=True):
        err, err16 = (o.float() - r32).abs().max(), (r16.float() - r32).abs().max()
        assert err <= 2 * err16 + 1e-2, (err, err16)


def test_rope_qkv_refuses_bad_shapes_and_handles_empty_batches():
    table = rope_table(4, 8)
    with pytest.raises(ValueError, match=r"qkv must be \[B, S, 3, H, d\]"):
        rope_qkv(torch.zeros(1, 4, 2, 2, 8), table)
    with pytest.raises(ValueError, match=r"table \[2, >= S, 1, d/2\]"):
        rope_qkv(torch.zeros(1, 5, 3, 2, 8), table)  # more positions than the table
    with pytest.raises(ValueError, match=r"d even"):
        rope_qkv(torch.zeros(1, 4, 3, 2, 7), table)
    q, k, v = rope_qkv(torch.zeros(0, 4, 3, 2, 8, device=_DEVICE), table.to(_DEVICE), kernel=True)
    assert q.shape == k.shape == v.shape == (0, 4, 2, 8)


def test_rope_ops_pass_opcheck():
    import integration.rope  # noqa: F401  (registers the ops)

    B, S, H, d = 2, 5, 3, 6
    table = rope_table(S, d).to(_DEVICE).contiguous()
    qkv = torch.randn(B, S, 3, H, d, device=_DEVICE)
    grads = [torch.randn(B, H, S, d, device=_DEVICE).transpose(1, 2) for _ in range(3)]
    for op, args in (
        (torch.ops.flashfusemoe.lm_rope_qkv.default, (qkv, table)),
        (torch.ops.flashfusemoe.lm_rope_qkv_bwd.default, (*grads, table)),
    ):
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), result
