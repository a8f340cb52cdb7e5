"""The normal form of a dispatch: what every communicator must deliver, independent of row order.

A rank's normal form is the sorted list of ``(token row, global expert, weight)`` over every received
slot with a local id. Rank r of any communicator must receive exactly the loopback entries, over all
source ranks, whose expert lies in r's block: ``normal_form(d, rank=r, world_size=W, num_experts=E) ==
expected_normal_form(inputs, r, W, E)``, bit for bit. Token rows stand for their tokens, so make them
distinct (random rows are). Use it to test your own communicator (docs/expert_parallelism.md).

Legend: T tokens, K top-k, E experts, e = E/W, W world size, D model dim, R rows received.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flashfusemoe.comm.alltoall import AllToAllCommunicator
from flashfusemoe.comm.base import Dispatched
from flashfusemoe.comm.loopback import LoopbackCommunicator

__all__ = ["SelfAllToAll", "expected_normal_form", "normal_form"]

Entry = tuple[tuple[float, ...], int, float]


def _entries(x_RD: torch.Tensor, ids_RK: torch.Tensor, w_RK: torch.Tensor, offset: int) -> list[Entry]:
    rows, ks = (ids_RK >= 0).nonzero(as_tuple=True)
    x = x_RD.float()[rows].tolist()
    experts = (ids_RK[rows, ks].long() + offset).tolist()
    weights = w_RK.float()[rows, ks].tolist()
    return [(tuple(xr), g, w) for xr, g, w in zip(x, experts, weights, strict=True)]


def normal_form(d: Dispatched, *, rank: int, world_size: int, num_experts: int) -> list[Entry]:
    """Rank ``rank``'s received slots as sorted ``(row, global expert, weight)`` entries."""
    offset = rank * (num_experts // world_size)
    return sorted(_entries(d.recv_x_RD, d.recv_topk_ids_RK, d.recv_topk_weights_RK, offset))


def expected_normal_form(
    inputs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    rank: int,
    world_size: int,
    num_experts: int,
) -> list[Entry]:
    """What rank ``rank`` must receive, from every source's ``(x_TD, topk_ids_TK, topk_weights_TK)``:
    the loopback dispatch's entries whose expert ``rank`` owns."""
    e = num_experts // world_size
    out = []
    for x_TD, ids_TK, w_TK in inputs:
        d = LoopbackCommunicator().dispatch(x_TD, ids_TK, w_TK, num_experts=num_experts)
        out += [
            en
            for en in _entries(d.recv_x_RD, d.recv_topk_ids_RK, d.recv_topk_weights_RK, 0)
            if rank * e <= en[1] < (rank + 1) * e
        ]
    return sorted(out)


class SelfAllToAll(AllToAllCommunicator):
    """A one-rank all-to-all communicator whose transport is a copy: the packed-row bookkeeping every
    all-to-all rank pays on top of the wire (counts, packing, unpacking, the combine's rank sum),
    measurable and testable on one device (``nccl`` of one rank is loopback and skips it)."""

    def __init__(self, sync_free: bool = False) -> None:
        self.rank, self.world_size, self.sync_free = 0, 1, sync_free

    def _all_to_all(self, send_SX, send_splits, recv_splits, what):
        return send_SX.clone()
