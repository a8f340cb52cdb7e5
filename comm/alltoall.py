"""Packed all-to-all communicators: one counts exchange per dispatch, one payload exchange per move.

Subclasses supply the transport (``all_to_all``); this module owns the row bookkeeping shared by every
all-to-all transport (``nccl`` over torch.distributed, ``fake`` threads in one process).

Legend: T tokens, K top-k, E experts, e = E/W local experts, W EP world size, S rows sent, R rows
received, B packed bytes per row, X any row width.
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from flashfusemoe.comm.base import Communicator, DispatchHandle, sort_slots_by_expert

__all__ = ["AllToAllCommunicator"]


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


def _pack(rows: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[torch.dtype, int]]]:
    """Several ``[S, X_i]`` tensors of any dtypes -> one ``[S, B]`` byte tensor, so a move is one exchange."""
    if len(rows) == 1:
        return rows[0].contiguous(), []
    layout = [(r.dtype, r.shape[1]) for r in rows]
    return torch.cat([r.contiguous().view(torch.uint8) for r in rows], dim=1), layout


def _unpack(packed: torch.Tensor, layout: list[tuple[torch.dtype, int]]) -> list[torch.Tensor]:
    if not layout:
        return [packed]
    out, col = [], 0
    for dtype, width in layout:
        nbytes = width * torch.empty((), dtype=dtype).element_size()
        out.append(packed[:, col : col + nbytes].contiguous().view(dtype))
        col += nbytes
    return out


class AllToAllCommunicator(Communicator):
    """Dispatch by all-to-all of rows, sorted by destination rank; received rows are reordered from
    arrival order (source, local expert, token) into the canonical (local expert, source, token)."""

    @abstractmethod
    def all_to_all(
        self, send_SX: torch.Tensor, send_splits: tuple[int, ...], recv_splits: tuple[int, ...]
    ) -> torch.Tensor:
        """Rows ``send_SX[sum(send_splits[:w]) : ...]`` go to rank w; returns the ``[R, X]`` rows
        received, source rank by source rank (``recv_splits[w]`` rows from rank w)."""

    def plan(self, topk_ids_TK: torch.Tensor, num_experts: int) -> DispatchHandle:
        self.check_plan_args(topk_ids_TK, num_experts)
        W, e = self.world_size, num_experts // self.world_size
        T, K = topk_ids_TK.shape
        slots_S, counts_E = sort_slots_by_expert(topk_ids_TK, num_experts)
        ones = (1,) * W
        recv_counts_We = self.all_to_all(counts_E.view(W, e), ones, ones)  # [source rank, local expert]
        send_splits = tuple(counts_E.view(W, e).sum(1).tolist())
        recv_splits = tuple(recv_counts_We.sum(1).tolist())
        # Arrival blocks are (source, expert)-major; canonical blocks are (expert, source)-major.
        arrival_start_eW = _exclusive_cumsum(recv_counts_We.reshape(-1)).view(W, e).t().reshape(-1)
        size_eW = recv_counts_We.t().reshape(-1)
        canonical_start_eW = _exclusive_cumsum(size_eW)
        R = sum(recv_splits)
        canonical_to_arrival_R = torch.arange(R, device=slots_S.device) + torch.repeat_interleave(
            arrival_start_eW - canonical_start_eW, size_eW, output_size=R
        )
        return DispatchHandle(
            T, K, slots_S, send_splits, recv_splits, canonical_to_arrival_R, recv_counts_We.sum(0)
        )

    def send(self, rows_SX: list[torch.Tensor], handle: DispatchHandle) -> list[torch.Tensor]:
        packed_SB, layout = _pack(rows_SX)
        arrived_RB = self.all_to_all(packed_SB, handle.send_splits, handle.recv_splits)
        return _unpack(arrived_RB.index_select(0, handle.canonical_to_arrival_R), layout)

    def send_back(self, rows_RX: list[torch.Tensor], handle: DispatchHandle) -> list[torch.Tensor]:
        packed_RB, layout = _pack(rows_RX)
        arrival_RB = torch.empty_like(packed_RB).index_copy_(0, handle.canonical_to_arrival_R, packed_RB)
        return _unpack(self.all_to_all(arrival_RB, handle.recv_splits, handle.send_splits), layout)
