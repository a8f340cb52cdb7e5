"""``nccl``: packed all-to-all over torch.distributed (any process-group backend: NCCL, gloo, ...).

Legend: S rows sent, R rows received, X any row width.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from flashfusemoe.comm.alltoall import AllToAllCommunicator

__all__ = ["NcclCommunicator"]


class NcclCommunicator(AllToAllCommunicator):
    """EP over a ``torch.distributed`` process group (None = the default group).

    Each dispatch does one counts all-to-all (which also syncs the host: the payload split sizes must be
    known) and one payload all-to-all; combine does one payload all-to-all.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("communicator 'nccl' needs torch.distributed initialized (init_process_group)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def all_to_all(
        self, send_SX: torch.Tensor, send_splits: tuple[int, ...], recv_splits: tuple[int, ...]
    ) -> torch.Tensor:
        recv_RX = send_SX.new_empty((sum(recv_splits), *send_SX.shape[1:]))
        dist.all_to_all_single(
            recv_RX, send_SX.contiguous(), list(recv_splits), list(send_splits), group=self.group
        )
        return recv_RX
