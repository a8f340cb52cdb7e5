"""A second, independent formulation of the MoE experts: every expert on every token, then a dense
``[T, E]`` combine matrix. O(T*E) work: for tests and small checks only.

Legend: T tokens, K top-k, E experts, D model dim, F rows of w_up, I intermediate dim.
"""

from __future__ import annotations

import torch

from flashfusemoe.spec import activate

__all__ = ["dense_experts"]


def dense_experts(
    x_TD: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    w_up_EFD: torch.Tensor,
    w_down_EDI: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """Same contract as ``experts``: ``[T, D]`` in x's dtype; slots with id -1 are ignored."""
    E = w_up_EFD.shape[0]
    valid_TK = topk_ids_TK >= 0
    combine_TE = torch.zeros(x_TD.shape[0], E, dtype=torch.float32, device=x_TD.device)
    combine_TE = combine_TE.scatter_add(
        1, topk_ids_TK.clamp(min=0), torch.where(valid_TK, topk_weights_TK.float(), 0.0)
    )
    h_ETF = torch.einsum("td,efd->etf", x_TD, w_up_EFD)
    y_ETD = torch.einsum("eti,edi->etd", activate(h_ETF, activation), w_down_EDI)
    return torch.einsum("te,etd->td", combine_TE, y_ETD.float()).to(x_TD.dtype)
