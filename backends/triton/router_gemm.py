"""Router logits in fp32 from bf16/fp16 tensor cores.

A product of two bf16 (or fp16) numbers is exact in fp32, so ``mm(x, gate.T, out_dtype=fp32)`` computes
the reference's ``x.float() @ gate.float().T`` up to summation order, at tensor-core speed instead of
fp32 SIMT. Backward splits the fp32 logit gradient into ``hi + lo`` low-precision halves and runs one GEMM
over both (``K = 2E``), keeping about 16 mantissa bits of the gradient.

Legend: T tokens, D model dim, E experts.
"""

from __future__ import annotations

import torch

from flashfusemoe.backends.torch.routing import router_logits as reference_router_logits

__all__ = ["router_logits"]


class _RouterLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, gate_ED):
        ctx.save_for_backward(x_TD, gate_ED)
        return torch.mm(x_TD, gate_ED.t(), out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_TE):
        x_TD, gate_ED = ctx.saved_tensors
        hi_TE = grad_TE.to(x_TD.dtype)
        hilo_T2E = torch.cat([hi_TE, (grad_TE - hi_TE.float()).to(x_TD.dtype)], dim=1)
        grad_x = grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(hilo_T2E, torch.cat([gate_ED, gate_ED]), out_dtype=torch.float32).to(x_TD.dtype)
        if ctx.needs_input_grad[1]:
            E = gate_ED.shape[0]
            both_2ED = torch.mm(hilo_T2E.t(), x_TD, out_dtype=torch.float32)
            grad_gate = (both_2ED[:E] + both_2ED[E:]).to(gate_ED.dtype)
        return grad_x, grad_gate


def router_logits(hidden_states_TD: torch.Tensor, gate_weight_ED: torch.Tensor) -> torch.Tensor:
    """fp32 ``[T, E]`` logits, as the reference; the tensor-core path for CUDA bf16/fp16 operands."""
    x, gate = hidden_states_TD, gate_weight_ED
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and gate.dtype == x.dtype:
        return _RouterLogits.apply(x, gate)
    return reference_router_logits(x, gate)
