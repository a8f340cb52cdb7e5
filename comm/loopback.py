"""``loopback``: the expert-parallel world of one rank, zero-copy.

Every expert is local, so ``dispatch`` returns the tokens, ids and weights themselves and ``combine``
returns the expert output itself: the layer through ``loopback`` IS the single-GPU layer (same kernels,
same bits, no host sync, nothing added to the autograd graph).

Legend: T tokens, K top-k, D model dim.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from flashfusemoe.comm.base import Communicator, Dispatched

__all__ = ["LOOPBACK", "LoopbackCommunicator", "LoopbackHandle", "loopback_when_alone"]


@dataclass(frozen=True)
class LoopbackHandle:
    """Attributes: ``num_recv`` (R = T: each token is its own received row)."""

    num_recv: int


class LoopbackCommunicator(Communicator):
    """EP = 1. Ids pass through unchecked (checking their values would cost a host sync per call): they
    must lie in ``[-1, E)``, as the router's do."""

    def __init__(self, group: object | None = None) -> None:
        self.rank, self.world_size = 0, 1

    def dispatch(
        self,
        x_TD: torch.Tensor,
        topk_ids_TK: torch.Tensor,
        topk_weights_TK: torch.Tensor,
        *,
        num_experts: int,
    ) -> Dispatched:
        self.check_dispatch_args(x_TD, topk_ids_TK, topk_weights_TK, num_experts)
        T, K = topk_ids_TK.shape
        return Dispatched(x_TD, topk_ids_TK, topk_weights_TK, LoopbackHandle(T), T * K)

    def combine(self, y_RD: torch.Tensor, handle: LoopbackHandle) -> torch.Tensor:
        self.check_combine_args(y_RD, handle, LoopbackHandle)
        return y_RD


LOOPBACK = LoopbackCommunicator()  # stateless: one instance serves every caller that has no communicator
_Method = TypeVar("_Method", bound=Callable)


def loopback_when_alone(method: _Method) -> _Method:
    """Wrap a transport's ``dispatch`` or ``combine``: in a group of one rank there is nothing to move,
    so the call is loopback's (zero-copy, no host sync, traceable by torch.compile), and EP = 1
    through that transport costs what the single-GPU layer costs."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.world_size == 1:
            return getattr(LOOPBACK, method.__name__)(*args, **kwargs)
        return method(self, *args, **kwargs)

    return wrapper
