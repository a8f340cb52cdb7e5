"""The shared experts' MLP (one expert on every row): ``act(x @ w_up.T) @ w_down.T`` whose backward keeps
only ``h = x @ w_up.T`` (or nothing with ``recompute``), as the routed experts' does: autograd through
the reference keeps ``h``, ``act(gate)`` and ``a`` (GLU), torch.compile ``h`` and ``a``.

The GEMMs are dense ``torch.mm`` (cuBLAS); the activation and its backward are the routed experts'
kernels, each a ``custom_op``. The backward differentiates the activation from ``h`` and returns ``a``
beside ``grad_h``, the operand of the ``w_down`` gradient.

Legend: R rows, D model dim, F rows of w_up (2I for GLU), I intermediate dim.
"""

from __future__ import annotations

import torch

from flashfusemoe.backends.triton.activation import activation_backward, activation_forward
from flashfusemoe.backends.triton.experts import saved_for_backward
from flashfusemoe.backends.triton.ops import as_op, custom_op
from flashfusemoe.spec import check_first_order, is_glu

__all__ = ["expert_mlp"]


def _live(h_RF: torch.Tensor) -> torch.Tensor:
    return torch.full((1,), h_RF.shape[0], dtype=torch.int32, device=h_RF.device)


def _act_fwd_fake(h_RF, activation):
    return h_RF.new_empty((h_RF.shape[0], h_RF.shape[1] // 2 if is_glu(activation) else h_RF.shape[1]))


@custom_op("mlp_act_fwd", _act_fwd_fake)
def _act_fwd(h_RF: torch.Tensor, activation: str) -> torch.Tensor:
    return activation_forward(h_RF, activation, _live(h_RF))


def _act_bwd_fake(grad_out_RD, h_RF, w_down_DI, activation, overwrite_h):
    return h_RF.new_empty(h_RF.shape), h_RF.new_empty((h_RF.shape[0], w_down_DI.shape[1]))


def _act_bwd_flops(grad_out_RD, h_RF, w_down_DI, activation, overwrite_h):
    return 2 * grad_out_RD[0] * w_down_DI[0] * w_down_DI[1]


@custom_op("mlp_act_bwd", _act_bwd_fake, flops=_act_bwd_flops)
def _act_bwd(
    grad_out_RD: torch.Tensor, h_RF: torch.Tensor, w_down_DI: torch.Tensor, activation: str, overwrite_h: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_h, a)``: ``grad_a = grad_out @ w_down`` (an internal buffer, then ``a`` written over it)
    through the activation's backward; ``grad_h`` over ``h`` itself with ``overwrite_h``."""
    grad_h_RF, a_RI, _ = activation_backward(
        h_RF, grad_out_RD @ w_down_DI, activation, _live(h_RF), None, None, overwrite_h
    )
    return grad_h_RF, a_RI


def _up_fake(x_RD, w_up_FD):
    return x_RD.new_empty((x_RD.shape[0], w_up_FD.shape[0]))


def _up_flops(x_RD, w_up_FD):
    return 2 * x_RD[0] * x_RD[1] * w_up_FD[0]


@custom_op("mlp_up_recompute", _up_fake, flops=_up_flops)
def _up_recompute(x_RD: torch.Tensor, w_up_FD: torch.Tensor) -> torch.Tensor:
    """``h = x @ w_up.T`` again in backward. An op of its own so that torch.compile keeps the recompute:
    as the forward's own ``mm``, the partitioner would merge the two and might save ``h`` after all."""
    return x_RD @ w_up_FD.t()


class _MLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RD, w_up_FD, w_down_DI, activation, recompute):
        h_RF = x_RD @ w_up_FD.t()
        out_RD = _act_fwd(h_RF, activation) @ w_down_DI.t()
        ctx.save_for_backward(h_RF.new_empty(0) if recompute else h_RF, x_RD, w_up_FD, w_down_DI)
        ctx.activation = activation
        return out_RD

    @staticmethod
    def backward(ctx, grad_out_RD):
        check_first_order("the triton backend's shared-expert MLP")
        h_kept, x_RD, w_up_FD, w_down_DI = saved_for_backward(ctx)
        recomputed = h_kept.dim() != 2
        h_RF = _up_recompute(x_RD, w_up_FD) if recomputed else h_kept  # the forward's GEMM: the same h
        # Eager: grad_h over h (kept: autograd is told, as in the routed experts' backward); an op's
        # output may not alias its input, so not while compiling.
        in_place = not as_op()
        grad_h_RF, a_RI = _act_bwd(grad_out_RD.contiguous(), h_RF, w_down_DI, ctx.activation, in_place)
        if in_place and not recomputed:
            torch.autograd.graph.increment_version(h_kept)
        need_x, need_up, need_down = ctx.needs_input_grad[:3]  # frozen weights: no GEMM for them
        grad_x = grad_h_RF @ w_up_FD if need_x else None
        grad_w_up = grad_h_RF.t() @ x_RD if need_up else None
        grad_w_down = grad_out_RD.t() @ a_RI if need_down else None
        return grad_x, grad_w_up, grad_w_down, None, None


def expert_mlp(
    x_RD: torch.Tensor,
    w_up_FD: torch.Tensor,
    w_down_DI: torch.Tensor,
    activation: str,
    recompute: bool = False,
) -> torch.Tensor:
    """Same contract as the reference ``expert_mlp``: ``act(x @ w_up.T) @ w_down.T`` -> ``[R, D]``, in
    x's dtype. Saves ``h`` for backward, or nothing with ``recompute=True``; in eager mode the backward
    writes ``h``'s gradient over the saved ``h`` (a second backward through one graph needs
    ``recompute=True``, as for the routed experts)."""
    return _MLP.apply(x_RD.contiguous(), w_up_FD, w_down_DI, activation, recompute)
