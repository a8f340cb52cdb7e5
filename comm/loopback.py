"""``loopback``: expert parallelism of one rank. The executable specification of dispatch order.

Legend: T tokens, K top-k, E experts, S = R kept slots, X any row width.
"""

from __future__ import annotations

import torch

from flashfusemoe.comm.base import Communicator, DispatchHandle, sort_slots_by_expert

__all__ = ["LoopbackCommunicator"]


class LoopbackCommunicator(Communicator):
    """EP world of one: received rows are this rank's kept slots sorted by (expert, token, k)."""

    def __init__(self, group: object | None = None) -> None:
        self.rank, self.world_size = 0, 1

    def plan(self, topk_ids_TK: torch.Tensor, num_experts: int) -> DispatchHandle:
        self.check_plan_args(topk_ids_TK, num_experts)
        slots_S, counts_E = sort_slots_by_expert(topk_ids_TK, num_experts)
        T, K = topk_ids_TK.shape
        S = slots_S.numel()
        return DispatchHandle(T, K, slots_S, (S,), (S,), None, counts_E)

    def send(self, rows_SX: list[torch.Tensor], handle: DispatchHandle) -> list[torch.Tensor]:
        return list(rows_SX)

    def send_back(self, rows_RX: list[torch.Tensor], handle: DispatchHandle) -> list[torch.Tensor]:
        return list(rows_RX)
