"""Fused expert computation: routing metadata -> gather -> grouped GEMM up -> activation -> grouped GEMM
down -> weighted combine, and its backward; ``grouped_mlp`` for rows that arrive already grouped (EP).

Forward and backward are each one ``torch.library.custom_op`` (opaque to torch.compile, no host sync),
tied together by an autograd.Function that saves only ``h`` (the up-projection, or nothing with
``recompute``) beside what the caller already holds (x, weights, routing).

Legend: T tokens, K top-k, N = T*K rows in expert order, E experts, D model dim, F = rows of w_up
(2I for GLU), I intermediate dim, R rows received (EP).
"""

from __future__ import annotations

import torch

from flashfusemoe.backends.triton.activation import activation_backward, activation_forward
from flashfusemoe.backends.triton.grouped_gemm import grouped_mm, grouped_mm_wgrad
from flashfusemoe.backends.triton.metadata import routing_metadata
from flashfusemoe.backends.triton.permute import combine_rows, gather_rows

__all__ = ["experts", "grouped_mlp"]


def _mlp_forward(x_ND, w_up_EFD, w_down_EDI, offs_E, live, activation):
    h_NF = grouped_mm(x_ND, w_up_EFD.transpose(1, 2), offs_E)
    a_NI = activation_forward(h_NF, activation, live)
    return h_NF, grouped_mm(a_NI, w_down_EDI.transpose(1, 2), offs_E)


def _mlp_backward(
    grad_y_ND, x_ND, h_NF, w_up_EFD, w_down_EDI, offs_E, live, activation, weights_S=None, row_slot_N=None
):
    """Gradients of the expert MLP rows. ``grad_y_ND`` is the unweighted row gradient; with weights the
    row outputs were ``w * y`` and ``grad_w_N = <grad_y, y>`` comes back too. Intermediates are freed
    as soon as they are used: the peak is the backward's, not the sum of its steps."""
    grad_a_NI = grouped_mm(grad_y_ND, w_down_EDI, offs_E)
    grad_h_NF, wa_NI, grad_w_N = activation_backward(h_NF, grad_a_NI, activation, live, weights_S, row_slot_N)
    del grad_a_NI
    grad_w_down = grouped_mm_wgrad(grad_y_ND, wa_NI, offs_E)
    del wa_NI
    grad_x_ND = grouped_mm(grad_h_NF, w_up_EFD, offs_E)
    grad_w_up = grouped_mm_wgrad(grad_h_NF, x_ND, offs_E)
    return grad_x_ND, grad_w_N, grad_w_up, grad_w_down


# ----------------------------------------------------------------- single device: tokens in, tokens out


@torch.library.custom_op("flashfusemoe::experts_fwd", mutates_args=())
def _experts_fwd(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str,
    save_h: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    meta = routing_metadata(topk_ids_TK, w_up.shape[0])
    x_ND = gather_rows(x_TD, meta.row_slot_N, meta.live, topk_ids_TK.shape[1])
    h_NF, y_ND = _mlp_forward(x_ND, w_up, w_down, meta.offs_E, meta.live, activation)
    out_TD, _ = combine_rows(y_ND, meta.pos_TK, weights_TK)
    return out_TD, meta.pos_TK, meta.row_slot_N, meta.offs_E, (h_NF if save_h else h_NF.new_empty(0))


@_experts_fwd.register_fake
def _(x_TD, weights_TK, topk_ids_TK, w_up, w_down, activation, save_h):
    T, K = topk_ids_TK.shape
    N, F, E = T * K, w_up.shape[1], w_up.shape[0]
    i32 = dict(dtype=torch.int32, device=x_TD.device)
    return (
        x_TD.new_empty(x_TD.shape),
        x_TD.new_empty((T, K), **i32),
        x_TD.new_empty((N,), **i32),
        x_TD.new_empty((E,), **i32),
        x_TD.new_empty((N, F) if save_h else (0,)),
    )


@torch.library.custom_op("flashfusemoe::experts_bwd", mutates_args=())
def _experts_bwd(
    grad_out_TD: torch.Tensor,
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    pos_TK: torch.Tensor,
    row_slot_N: torch.Tensor,
    offs_E: torch.Tensor,
    h_saved: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    K = pos_TK.shape[1]
    live = offs_E[-1:]
    x_ND = gather_rows(x_TD, row_slot_N, live, K)
    h_NF = h_saved if h_saved.dim() == 2 else grouped_mm(x_ND, w_up.transpose(1, 2), offs_E)  # 1-D: recompute
    grad_y_ND = gather_rows(grad_out_TD.contiguous(), row_slot_N, live, K)
    grad_x_ND, grad_w_N, grad_w_up, grad_w_down = _mlp_backward(
        grad_y_ND, x_ND, h_NF, w_up, w_down, offs_E, live, activation, weights_TK.reshape(-1), row_slot_N
    )
    del grad_y_ND, x_ND, h_NF
    grad_x_TD, grad_w_TK = combine_rows(grad_x_ND, pos_TK, None, grad_w_N)
    return grad_x_TD, grad_w_TK, grad_w_up, grad_w_down


@_experts_bwd.register_fake
def _(grad_out_TD, x_TD, weights_TK, w_up, w_down, pos_TK, row_slot_N, offs_E, h_saved, activation):
    return (
        x_TD.new_empty(x_TD.shape),
        weights_TK.new_empty(weights_TK.shape, dtype=torch.float32),
        w_up.new_empty(w_up.shape),
        w_down.new_empty(w_down.shape),
    )


class _Experts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, weights_TK, w_up, w_down, topk_ids_TK, activation, recompute):
        out_TD, pos_TK, row_slot_N, offs_E, h_NF = _experts_fwd(
            x_TD, weights_TK, topk_ids_TK, w_up, w_down, activation, not recompute
        )
        ctx.save_for_backward(x_TD, weights_TK, w_up, w_down, pos_TK, row_slot_N, offs_E, h_NF)
        ctx.activation = activation
        ctx.mark_non_differentiable(pos_TK, row_slot_N, offs_E)
        return out_TD

    @staticmethod
    def backward(ctx, grad_out_TD):
        saved = ctx.saved_tensors
        grad_x, grad_w, grad_up, grad_down = _experts_bwd(grad_out_TD, *saved[:4], *saved[4:], ctx.activation)
        return grad_x, grad_w, grad_up, grad_down, None, None, None


def experts(
    x_TD: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    w_up_EFD: torch.Tensor,
    w_down_EDI: torch.Tensor,
    activation: str,
    recompute: bool = False,
) -> torch.Tensor:
    """Same contract as the reference ``experts``: ``[T, D]`` in x's dtype, slots with id -1 ignored.
    ``recompute=True`` saves no activations; backward recomputes the up-projection."""
    return _Experts.apply(
        x_TD.contiguous(),
        topk_weights_TK.float().contiguous(),
        w_up_EFD,
        w_down_EDI,
        topk_ids_TK.contiguous(),
        activation,
        recompute,
    )


# ----------------------------------------------------------------- expert parallel: rows already grouped


class _GroupedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RD, w_up, w_down, offs_E, activation, recompute):
        live = offs_E[-1:]
        h_RF, y_RD = _mlp_forward(x_RD, w_up, w_down, offs_E, live, activation)
        ctx.save_for_backward(x_RD, w_up, w_down, offs_E, None if recompute else h_RF)
        ctx.activation = activation
        return y_RD

    @staticmethod
    def backward(ctx, grad_y_RD):
        x_RD, w_up, w_down, offs_E, h_RF = ctx.saved_tensors
        if h_RF is None:
            h_RF = grouped_mm(x_RD, w_up.transpose(1, 2), offs_E)
        grad_x, _, grad_up, grad_down = _mlp_backward(
            grad_y_RD.contiguous(), x_RD, h_RF, w_up, w_down, offs_E, offs_E[-1:], ctx.activation
        )
        return grad_x, grad_up, grad_down, None, None, None


def grouped_mlp(
    x_RD: torch.Tensor,
    counts_e: torch.Tensor,
    w_up_eFD: torch.Tensor,
    w_down_eDI: torch.Tensor,
    activation: str,
    recompute: bool = False,
) -> torch.Tensor:
    """Rows grouped by local expert (``counts_e`` rows each, in order) -> ``[R, D]``."""
    offs_E = torch.cumsum(counts_e, 0, dtype=torch.int32)
    return _GroupedMLP.apply(x_RD.contiguous(), w_up_eFD, w_down_eDI, offs_E, activation, recompute)
