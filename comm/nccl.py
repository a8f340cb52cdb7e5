"""``nccl``: packed all-to-all over torch.distributed (any process-group backend: NCCL on GPUs, gloo on
CPU and on CUDA tensors).

Legend: S rows sent, R rows received, X any row width.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from flashfusemoe.comm.alltoall import AllToAllCommunicator
from flashfusemoe.comm.loopback import loopback_when_alone

__all__ = ["NcclCommunicator"]


class NcclCommunicator(AllToAllCommunicator):
    """EP over a ``torch.distributed`` process group (None = the default group).

    A dispatch makes one counts all-to-all and one payload all-to-all, and the host waits once, for the
    split sizes (copied to pinned memory behind an event, after the packing is launched); a combine, and
    each backward, one payload all-to-all. ``sync_free=True``: no counts exchange and no host read, at
    the cost of worst-case buffers (:mod:`flashfusemoe.comm.alltoall`); every rank must then have the
    same number of tokens. A group of one rank moves nothing: dispatch and combine are then loopback's.
    """

    dispatch = loopback_when_alone(AllToAllCommunicator.dispatch)
    combine = loopback_when_alone(AllToAllCommunicator.combine)

    def __init__(self, group: dist.ProcessGroup | None = None, *, sync_free: bool = False) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("communicator 'nccl' needs torch.distributed initialized (init_process_group)")
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise TypeError(
                f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}"
            )
        if not isinstance(sync_free, bool):
            raise TypeError(f"sync_free must be a bool, got {type(sync_free).__name__}")
        self.group, self.sync_free = group, sync_free
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def _all_to_all(
        self, send_SX: torch.Tensor, send_splits: tuple[int, ...], recv_splits: tuple[int, ...], what: str
    ) -> torch.Tensor:
        recv_RX = send_SX.new_empty((sum(recv_splits), *send_SX.shape[1:]))
        dist.all_to_all_single(
            recv_RX, send_SX.contiguous(), list(recv_splits), list(send_splits), group=self.group
        )
        return recv_RX
