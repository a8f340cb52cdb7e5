"""Fused expert computation: routing metadata -> grouped GEMM up over gathered rows, with the activation
(one TMA kernel on Hopper) -> grouped GEMM down -> weighted combine, and its backward. The same code for
every world size: under expert parallelism the "tokens" are the rows a communicator delivered, with
their local expert ids (-1 for experts elsewhere) and weights.

Where QuACK runs and measured faster (``quack_gemm.py``, ``FLASHFUSEMOE_GEMM``), its GEMMs take all six
products, the backward's row gathers and the activation backward (``gemms`` = ``quack_gemm.ALL``), or
only the two weight gradients (``WGRAD``); ``NONE``: ours and ``torch._grouped_mm``.

Each step is a ``torch.library.custom_op`` (opaque to torch.compile, no host sync) under an
autograd.Function that saves only ``h`` (the up-projection, or nothing with ``recompute``) beside what
the caller already holds (x, weights, routing).

Legend: T tokens (or received rows), K top-k, N rows in expert order (T*K, or the caller's bound on the
kept slots), E experts (local), D model dim, F = rows of w_up (2I for GLU), I intermediate dim.
"""

from __future__ import annotations

import torch

from flashfusemoe.backends.triton import quack_gemm
from flashfusemoe.backends.triton.activation import activation_backward
from flashfusemoe.backends.triton.grouped_gemm import grouped_mm, grouped_mm_act, grouped_mm_wgrad
from flashfusemoe.backends.triton.metadata import routing_metadata
from flashfusemoe.backends.triton.ops import as_op, custom_op
from flashfusemoe.backends.triton.permute import combine_rows, gather_rows
from flashfusemoe.spec import check_first_order, is_glu

__all__ = ["experts", "saved_for_backward"]


# --------------------------------------------- tokens (or received rows) in, one output row per input row
# Two autograd nodes, up (gather + GEMM + activation) and down (GEMM + combine; activation backward),
# so that autograd accumulates and frees each weight gradient before the other is computed.


def _up_fwd_fake(x_TD, topk_ids_TK, w_up, activation, num_rows, gemms):
    T, K = topk_ids_TK.shape
    F = w_up.shape[1]
    i32 = dict(dtype=torch.int32)
    return (
        x_TD.new_empty((num_rows, F)),
        x_TD.new_empty((num_rows, F // 2 if is_glu(activation) else F)),
        x_TD.new_empty((T, K), **i32),
        x_TD.new_empty((num_rows,), **i32),
        x_TD.new_empty((num_rows if gemms != quack_gemm.NONE else 0,), **i32),
        x_TD.new_empty((w_up.shape[0] + 1,), **i32),
    )


def _up_fwd_flops(x_TD, topk_ids_TK, w_up, activation, num_rows, gemms):
    return 2 * num_rows * w_up[1] * w_up[2]  # shapes: w_up = [E, F, D]


@custom_op("moe_up_fwd", _up_fwd_fake, flops=_up_fwd_flops)
def _up_fwd(
    x_TD: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    w_up: torch.Tensor,
    activation: str,
    num_rows: int,
    gemms: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h, a, pos, row_slot, row_token, bounds)`` (``row_token`` empty where no GEMM is on QuACK); with
    ``gemms`` = ALL on QuACK's GEMM (``h``'s columns interleaved)."""
    meta = routing_metadata(topk_ids_TK, w_up.shape[0], num_rows, row_tokens=gemms != quack_gemm.NONE)
    if gemms == quack_gemm.ALL:
        h_NF, a_NI = quack_gemm.up(x_TD, w_up, meta.bounds_E1, meta.row_token_M)
    else:  # expert-order row r is token row_slot[r] // K
        gather = (meta.row_slot_M, topk_ids_TK.shape[1])
        h_NF, a_NI = grouped_mm_act(x_TD, w_up.transpose(1, 2), meta.offs_E, activation, gather=gather)
    return h_NF, a_NI, meta.pos_TK, meta.row_slot_M, meta.row_token_M, meta.bounds_E1


def _wgrad_fake(w, grad_w_acc, need_grad_w):
    return w.new_empty(w.shape if grad_w_acc is None and need_grad_w else (0,))


def _up_bwd_fake(
    grad_h_NF, x_TD, w_up, pos_TK, row_slot_N, row_token_N, bounds_E1, grad_w_up_acc, need_grad_w_up, gemms
):
    return x_TD.new_empty(x_TD.shape), _wgrad_fake(w_up, grad_w_up_acc, need_grad_w_up)


def _up_bwd_flops(grad_h_NF, x_TD, w_up, *rest):
    need_grad_w_up = rest[-2]
    return (2 + 2 * need_grad_w_up) * grad_h_NF[0] * w_up[1] * w_up[2]  # grad_x (and grad_w_up)


@custom_op("moe_up_bwd", _up_bwd_fake, mutates=("grad_w_up_acc",), flops=_up_bwd_flops)
def _up_bwd(
    grad_h_NF: torch.Tensor,
    x_TD: torch.Tensor,
    w_up: torch.Tensor,
    pos_TK: torch.Tensor,
    row_slot_N: torch.Tensor,
    row_token_N: torch.Tensor,
    bounds_E1: torch.Tensor,
    grad_w_up_acc: torch.Tensor | None,
    need_grad_w_up: bool,
    gemms: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_w_up)``; with ``grad_w_up_acc`` the weight gradient is added into it instead,
    and without ``need_grad_w_up`` not computed (a frozen weight): ``grad_w_up`` is then empty."""
    if gemms == quack_gemm.ALL:
        grad_rows, grad_w_up = quack_gemm.up_backward(
            grad_h_NF, x_TD, w_up, bounds_E1, row_token_N, grad_w_up_acc, need_grad_w_up
        )
        return combine_rows(grad_rows, pos_TK), grad_w_up
    offs_E = bounds_E1[1:]
    grad_w_up = grad_h_NF.new_empty(0)
    if need_grad_w_up and gemms == quack_gemm.WGRAD:  # x's token rows read through the index
        grad_w_up = quack_gemm.weight_grad(
            x_TD, grad_h_NF, w_up, bounds_E1, row_token_N, grad_w_up_acc, "wgrad_rows", True
        )
    elif need_grad_w_up:
        x_ND = gather_rows(x_TD, row_slot_N, offs_E[-1:], pos_TK.shape[1])
        grad_w_up = _wgrad(grad_h_NF, x_ND, offs_E, grad_w_up_acc)
        del x_ND
    grad_x_TD = combine_rows(grouped_mm(grad_h_NF, w_up, offs_E), pos_TK)
    return grad_x_TD, grad_w_up


def _wgrad(a_NP, b_NQ, offs_E, acc_EPQ):
    """The weight gradient, fresh; or added into ``acc`` (then an empty tensor: a custom op's output
    may not alias its input)."""
    if acc_EPQ is None:
        return grouped_mm_wgrad(a_NP, b_NQ, offs_E)
    grouped_mm_wgrad(a_NP, b_NQ, offs_E, out=acc_EPQ)
    return acc_EPQ.new_empty(0)


def _down_fwd_fake(a_NI, weights_TK, w_down, pos_TK, bounds_E1, gemms):
    return a_NI.new_empty((pos_TK.shape[0], w_down.shape[1]))


def _down_fwd_flops(a_NI, weights_TK, w_down, pos_TK, bounds_E1, gemms):
    return 2 * a_NI[0] * w_down[1] * w_down[2]


@custom_op("moe_down_fwd", _down_fwd_fake, flops=_down_fwd_flops)
def _down_fwd(
    a_NI: torch.Tensor,
    weights_TK: torch.Tensor,
    w_down: torch.Tensor,
    pos_TK: torch.Tensor,
    bounds_E1: torch.Tensor,
    gemms: str,
) -> torch.Tensor:
    y_ND = (
        quack_gemm.down(a_NI, w_down, bounds_E1)
        if gemms == quack_gemm.ALL
        else grouped_mm(a_NI, w_down.transpose(1, 2), bounds_E1[1:])
    )
    return combine_rows(y_ND, pos_TK, weights_TK)


def _down_bwd_fake(
    grad_out_TD,
    h_saved,
    x_TD,
    w_up,
    weights_TK,
    w_down,
    pos_TK,
    row_slot_N,
    row_token_N,
    bounds_E1,
    act,
    reuse,
    grad_w_down_acc,
    need_grad_w_down,
    gemms,
):
    return (
        x_TD.new_empty((row_slot_N.shape[0], w_up.shape[1])),
        weights_TK.new_empty(weights_TK.shape, dtype=torch.float32),
        _wgrad_fake(w_down, grad_w_down_acc, need_grad_w_down),
    )


def _down_bwd_flops(grad_out_TD, h_saved, x_TD, w_up, weights_TK, w_down, pos_TK, row_slot_N, *rest):
    N, need_grad_w_down = row_slot_N[0], rest[-2]
    recomputed = 2 * N * w_up[1] * w_up[2] if len(h_saved) != 2 else 0
    return recomputed + (2 + 2 * need_grad_w_down) * N * w_down[1] * w_down[2]  # (h,) grad_a (, grad_w)


@custom_op("moe_down_bwd", _down_bwd_fake, mutates=("grad_w_down_acc",), flops=_down_bwd_flops)
def _down_bwd(
    grad_out_TD: torch.Tensor,
    h_saved: torch.Tensor,
    x_TD: torch.Tensor,
    w_up: torch.Tensor,
    weights_TK: torch.Tensor,
    w_down: torch.Tensor,
    pos_TK: torch.Tensor,
    row_slot_N: torch.Tensor,
    row_token_N: torch.Tensor,
    bounds_E1: torch.Tensor,
    activation: str,
    reuse_h: bool,
    grad_w_down_acc: torch.Tensor | None,
    need_grad_w_down: bool,
    gemms: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``grad_h`` (over ``h_saved`` itself with ``reuse_h``), the routing-weight and ``w_down`` grads
    (the last added into ``grad_w_down_acc`` if given, not computed without ``need_grad_w_down``:
    then empty)."""
    recomputed = h_saved.dim() != 2  # the forward kept no activations
    if gemms == quack_gemm.ALL:
        h_NF = quack_gemm.recompute_h(x_TD, w_up, bounds_E1, row_token_N) if recomputed else h_saved
        grad_h_NF, grad_w_S, grad_w_down = quack_gemm.down_backward(
            grad_out_TD.contiguous(), h_NF, w_down, weights_TK.reshape(-1), bounds_E1, row_slot_N,
            row_token_N, recomputed or reuse_h, grad_w_down_acc, need_grad_w_down,
        )  # fmt: skip
        return grad_h_NF, grad_w_S.view(pos_TK.shape), grad_w_down
    offs_E, live, K = bounds_E1[1:], bounds_E1[-1:], pos_TK.shape[1]
    h_NF = grouped_mm(x_TD, w_up.transpose(1, 2), offs_E, gather=(row_slot_N, K)) if recomputed else h_saved
    # grad_out's rows in expert order (unweighted: the weights enter in the activation backward), one
    # copy for both GEMMs: a weight gradient reading rows through the index ran 1.4-1.8x slower (H100).
    grad_y = gather_rows(grad_out_TD.contiguous(), row_slot_N, live, K)
    grad_a_NI = grouped_mm(grad_y, w_down, offs_E)
    grad_h_NF, wa_NI, grad_w_S = activation_backward(
        h_NF, grad_a_NI, activation, live, weights_TK.reshape(-1), row_slot_N, recomputed or reuse_h
    )
    del grad_a_NI, h_NF
    grad_w_down = wa_NI.new_empty(0)
    if need_grad_w_down and gemms == quack_gemm.WGRAD:
        grad_w_down = quack_gemm.weight_grad(
            grad_y, wa_NI, w_down, bounds_E1, None, grad_w_down_acc, "wgrad_rows"
        )
    elif need_grad_w_down:
        grad_w_down = _wgrad(grad_y, wa_NI, offs_E, grad_w_down_acc)
    return grad_h_NF, grad_w_S.view(pos_TK.shape), grad_w_down


def _grad_buffer(ctx, i: int) -> torch.Tensor | None:
    """The ``.grad`` buffer that forward input ``i``'s gradient may be added into in place, else None.

    Autograd would add a returned gradient into an existing ``.grad`` anyway (gradient accumulation,
    ``zero_grad(set_to_none=False)``); adding it in the weight-gradient GEMM's epilogue skips the
    fresh ``[E, ., .]`` tensor (the backward's largest) and a pass over it. Only where the result is
    the same: eager (``create_graph`` is refused before this); a leaf whose AccumulateGrad node this
    backward runs (not ``autograd.grad``); a dense ``.grad`` of the leaf's shape, dtype and device;
    no tensor hooks on the leaf (they would be handed None). DDP's hooks on the AccumulateGrad node
    still run, after the buffer is updated."""
    if torch.compiler.is_compiling():
        return None
    node = ctx.next_functions[i][0]
    if type(node).__name__ != "AccumulateGrad":
        return None
    w = node.variable
    grad = w.grad
    if grad is None or w._backward_hooks or not grad.is_contiguous() or grad.is_sparse:
        return None
    if grad.shape != w.shape or grad.dtype != w.dtype or grad.device != w.device:
        return None
    try:
        runs = torch._C._will_engine_execute_node(node)
    except RuntimeError:  # autograd.grad() with this leaf among its inputs: .grad is not touched
        return None
    return grad if runs else None


def saved_for_backward(ctx) -> tuple[torch.Tensor, ...]:
    """``ctx.saved_tensors``, with PyTorch's saved-tensor version error explained."""
    try:
        return ctx.saved_tensors
    except RuntimeError as e:
        if "inplace" not in str(e):  # PyTorch's saved-tensor version check; anything else as is
            raise
        raise RuntimeError(
            "a tensor saved for the MoE layer's backward was modified in place: either this is a "
            "second backward through the same graph (the first one reuses the saved activations' "
            "buffer; pass recompute_activations=True to backward twice), or the layer's input or "
            "weights were changed in place after the forward"
        ) from e


class _Up(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_up, topk_ids_TK, activation, num_rows, gemms):
        h_NF, a_NI, *routing = _up_fwd(x_TD, topk_ids_TK, w_up, activation, num_rows, gemms)
        ctx.save_for_backward(x_TD, w_up, *routing)
        ctx.gemms = gemms
        ctx.mark_non_differentiable(*routing)
        ctx.set_materialize_grads(False)  # a's gradient never comes: _Down's backward goes through h
        return h_NF, a_NI, *routing

    @staticmethod
    def backward(ctx, grad_h_NF, _grad_a, *_routing):
        check_first_order("the triton backend's experts")
        need, acc = ctx.needs_input_grad[1], _grad_buffer(ctx, 1)  # a frozen w_up: no dW GEMM
        grad_x, grad_w_up = _up_bwd(grad_h_NF.contiguous(), *ctx.saved_tensors, acc, need, ctx.gemms)
        return grad_x, grad_w_up if need and acc is None else None, None, None, None, None


class _Down(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        h_NF,
        a_NI,
        weights_TK,
        w_down,
        pos_TK,
        row_slot_N,
        row_token_N,
        bounds_E1,
        x_TD,
        w_up,
        activation,
        recompute,
        gemms,
    ):
        """``a = act(h)`` comes in beside ``h``: the backward differentiates the activation itself, from
        ``h`` (kept, or recomputed), and returns ``h``'s gradient; ``a`` gets none."""
        out_TD = _down_fwd(a_NI, weights_TK, w_down, pos_TK, bounds_E1, gemms)
        kept_h = h_NF.new_empty(0) if recompute else h_NF
        routing = (pos_TK, row_slot_N, row_token_N, bounds_E1)
        ctx.save_for_backward(kept_h, x_TD, w_up, weights_TK, w_down, *routing)
        ctx.activation, ctx.gemms = activation, gemms
        return out_TD

    @staticmethod
    def backward(ctx, grad_out_TD):
        check_first_order("the triton backend's experts")
        h_kept, *rest = saved_for_backward(ctx)
        # Eager mode writes grad_h over the saved h (the backward's largest buffer) and tells autograd,
        # so a second backward fails loudly instead of reading it; compiled graphs plan their own memory
        # (and an op's output may not alias its input).
        reuse_h = h_kept.dim() == 2 and not as_op()
        need, acc = ctx.needs_input_grad[3], _grad_buffer(ctx, 3)
        grad_h, grad_w, grad_w_down = _down_bwd(
            grad_out_TD, h_kept, *rest, ctx.activation, reuse_h, acc, need, ctx.gemms
        )
        if reuse_h:
            torch.autograd.graph.increment_version(h_kept)
        grad_w_down = grad_w_down if need and acc is None else None
        return grad_h, None, grad_w, grad_w_down, *(None,) * 9


def experts(
    x_TD: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    w_up_EFD: torch.Tensor,
    w_down_EDI: torch.Tensor,
    activation: str,
    recompute: bool = False,
    num_slots: int | None = None,
) -> torch.Tensor:
    """Same contract as the reference ``experts``: ``[T, D]`` in x's dtype; slots whose id is not in
    ``[0, E)`` are ignored. ``num_slots`` bounds the slots with an id in ``[0, E)`` (default T*K): the
    expert-order buffers get that many rows. Saves the up-projection ``h`` for backward, or nothing
    with ``recompute=True`` (backward then recomputes ``h`` from x). In eager mode the backward writes
    ``h``'s gradient over the saved ``h``, so backpropagating twice through one graph
    (``retain_graph=True``) needs ``recompute=True``."""
    if x_TD.device.type == "cpu" and x_TD.dtype != torch.float32:  # the interpreter mishandles 16-bit
        raise TypeError(
            f"the triton backend on the CPU interpreter computes fp32 only, got hidden_states of "
            f"{x_TD.dtype}: use backend='torch' on CPU, or a GPU"
        )
    x_TD = x_TD.contiguous()
    T, K = topk_ids_TK.shape
    num_rows = T * K if num_slots is None else num_slots
    gemms = quack_gemm.plan(x_TD, w_up_EFD, w_down_EDI, activation, num_rows)
    h_NF, a_NI, *routing = _Up.apply(x_TD, w_up_EFD, topk_ids_TK.contiguous(), activation, num_rows, gemms)
    weights_TK = topk_weights_TK.float().contiguous()
    return _Down.apply(
        h_NF,
        a_NI,
        weights_TK,
        w_down_EDI,
        *routing,
        x_TD,
        w_up_EFD,
        activation,
        recompute,
        gemms,
    )
