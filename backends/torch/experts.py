"""Reference expert computation: a Python loop over experts, plain matmuls, autograd by torch.

Numerics (the contract every backend matches): each GEMM takes operands in the activations' dtype and
returns that dtype (fp32 accumulation inside); the activation runs in that dtype; the weighted combine
accumulates a token's K rows in fp32 and casts the sum back.

Legend: T tokens, K top-k, e local experts, D model dim, I intermediate dim, F = rows of w_up,
R grouped rows (sorted by expert).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from flashfusemoe.spec import activate

__all__ = ["expert_mlp", "experts"]


def _mlp(x_RD, w_up_FD, w_down_DI, activation):
    return activate(x_RD @ w_up_FD.t(), activation) @ w_down_DI.t()


def expert_mlp(
    x_RD: torch.Tensor,
    w_up_FD: torch.Tensor,
    w_down_DI: torch.Tensor,
    activation: str,
    recompute: bool = False,
) -> torch.Tensor:
    """One expert on its rows: ``act(x @ w_up.T) @ w_down.T`` -> ``[R, D]``. With ``recompute`` (and
    grad mode on) it keeps only its inputs for backward and recomputes the rest there (checkpoint)."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(_mlp, x_RD, w_up_FD, w_down_DI, activation, use_reentrant=False)
    return _mlp(x_RD, w_up_FD, w_down_DI, activation)


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
    """``out[t] = sum_k w[t,k] * expert_{ids[t,k]}(x[t])`` over slots whose id is in ``[0, E)``; ``[T, D]``.

    Under expert parallelism the T "tokens" are the rows a communicator delivered and E the local
    experts; an id of -1 marks an expert elsewhere (or a dropped slot). ``num_slots`` is an upper bound
    on the slots with an id in ``[0, E)``, which fused backends size their buffers by (unused here)."""
    out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    for e in range(w_up_EFD.shape[0]):
        token_R, slot_R = torch.where(topk_ids_TK == e)
        # an empty expert still runs (on 0 rows): its weights get zero gradients, not None
        y_RD = expert_mlp(x_TD[token_R], w_up_EFD[e], w_down_EDI[e], activation, recompute)
        out_TD = out_TD.index_add(0, token_R, y_RD.float() * topk_weights_TK[token_R, slot_R, None])
    return out_TD.to(x_TD.dtype)
