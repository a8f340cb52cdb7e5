"""Router logits in fp32 from bf16/fp16 tensor cores.

A product of two bf16 (or fp16) numbers is exact in fp32, so ``mm(x, gate.T, out_dtype=fp32)`` computes
the reference's ``x.float() @ gate.float().T`` up to summation order, at tensor-core speed instead of
fp32 SIMT. Backward splits the fp32 logit gradient into ``hi + lo`` low-precision halves and runs one GEMM
over both (``K = 2E``), keeping about 16 mantissa bits of the gradient; one kernel makes the split.

Legend: T tokens, D model dim, E experts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashfusemoe.backends.torch.routing import router_logits as reference_router_logits
from flashfusemoe.backends.triton.launch import cdiv, fast_launch
from flashfusemoe.backends.triton.ops import custom_op
from flashfusemoe.spec import check_first_order

__all__ = ["router_logits"]


@fast_launch
@triton.jit
def _hi_lo_kernel(g_ptr, out_ptr, n, E: tl.constexpr, BLOCK: tl.constexpr):
    """``out[t] = [hi(g[t]), lo(g[t])]`` with ``hi = low(g)``, ``lo = low(g - hi)``: ``[T, 2E]``."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    g = tl.load(g_ptr + i, mask=ok)
    hi = g.to(out_ptr.dtype.element_ty)
    lo = (g - hi.to(tl.float32)).to(out_ptr.dtype.element_ty)
    row, col = i // E, i % E
    tl.store(out_ptr + row * (2 * E) + col, hi, mask=ok)
    tl.store(out_ptr + row * (2 * E) + E + col, lo, mask=ok)


def _hi_lo_fake(grad_TE, dtype):
    return grad_TE.new_empty((grad_TE.shape[0], 2 * grad_TE.shape[1]), dtype=dtype)


@custom_op("router_hi_lo", _hi_lo_fake)
def _hi_lo(grad_TE: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    T, E = grad_TE.shape
    out_T2E = grad_TE.new_empty((T, 2 * E), dtype=dtype)
    if T:
        _hi_lo_kernel[(cdiv(T * E, 1024),)](grad_TE.contiguous(), out_T2E, T * E, E=E, BLOCK=1024)
    return out_T2E


class _RouterLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, gate_ED):
        ctx.save_for_backward(x_TD, gate_ED)
        return torch.mm(x_TD, gate_ED.t(), out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_TE):
        check_first_order("the triton backend's router GEMM")
        x_TD, gate_ED = ctx.saved_tensors
        hilo_T2E = _hi_lo(grad_TE, x_TD.dtype)
        grad_x = grad_gate = None
        if ctx.needs_input_grad[0]:  # one fp32-accumulated GEMM over both halves, rounded once
            grad_x = torch.mm(hilo_T2E, torch.cat([gate_ED, gate_ED]))
        if ctx.needs_input_grad[1]:
            E = gate_ED.shape[0]
            both_2ED = torch.mm(hilo_T2E.t(), x_TD, out_dtype=torch.float32)
            grad_gate = both_2ED.view(2, E, -1).sum(0).to(gate_ED.dtype)
        return grad_x, grad_gate


def router_logits(hidden_states_TD: torch.Tensor, gate_weight_ED: torch.Tensor) -> torch.Tensor:
    """fp32 ``[T, E]`` logits, as the reference; the tensor-core path for CUDA bf16/fp16 operands."""
    x, gate = hidden_states_TD, gate_weight_ED
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and gate.dtype == x.dtype:
        return _RouterLogits.apply(x, gate)
    return reference_router_logits(x, gate)
