"""The Communicator contract: expert-parallel ``dispatch`` / ``combine``, shaped like DeepEP's.

``dispatch`` moves each token to every rank that owns at least one of its K experts, once per (token,
destination rank), with the token's K expert ids (local to the receiver: ``[0, e)``, or -1 where the
slot's expert lives elsewhere or the slot was dropped) and K weights (0 where the id is -1). The rows
arrive in the transport's own order. The experts make one row per received row (the weighted sum over
that row's local experts), and ``combine`` returns each row to its source rank and sums a token's rows
over ranks in fp32, in rank order (deterministic), cast back to the rows' dtype.

Communicators move rows only: they never reorder rows for a GEMM (the experts do that), and never apply
the weights (the experts do). Both methods are differentiable: dispatch's backward is a combine with
the same handle (a token's row gradients summed over ranks, each weight gradient returned to its
slot); combine's backward is a dispatch of the output gradient replayed from the handle. State between
dispatch and combine travels in the handle; a communicator keeps no per-call state on ``self``.

Legend: T tokens (this rank), K top-k, E experts (global), e = E/W local experts, D model dim,
R rows received by this rank, W EP world size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, NamedTuple

import torch

from flashfusemoe.spec import check_hidden, check_topk

__all__ = ["Communicator", "Dispatched"]


class Dispatched(NamedTuple):
    """What ``dispatch`` returns: the R rows that arrived on this rank.

    Attributes:
        recv_x_RD: ``[R, D]`` token rows, x's dtype, in the transport's order.
        recv_topk_ids_RK: ``[R, K]`` int expert ids local to this rank, ``[0, e)``, or -1 (the slot's
            expert lives elsewhere, or the slot was dropped). Every row has at least one id >= 0,
            except the padding rows of a sync-free transport (all -1).
        recv_topk_weights_RK: ``[R, K]`` the slots' routing weights (the given weights' dtype), 0 where
            the id is -1; differentiable.
        handle: what ``combine`` (and both backwards) need; opaque to the caller.
        num_recv_slots: an upper bound on the ids >= 0 of ``recv_topk_ids_RK``, the rows of the
            experts' grouped GEMMs (exact where the transport read the counts on the host; ``R*K``
            where it did not). The experts size their buffers by it.
    """

    recv_x_RD: torch.Tensor
    recv_topk_ids_RK: torch.Tensor
    recv_topk_weights_RK: torch.Tensor
    handle: Any
    num_recv_slots: int


class Communicator(ABC):
    """Moves token rows between the W ranks of an expert-parallel group (the module docstring has the
    contract). Rank ``rank`` owns the experts ``[rank*E/W, (rank+1)*E/W)``."""

    rank: int
    world_size: int

    @abstractmethod
    def dispatch(
        self,
        x_TD: torch.Tensor,
        topk_ids_TK: torch.Tensor,
        topk_weights_TK: torch.Tensor,
        *,
        num_experts: int,
    ) -> Dispatched:
        """Send each token to the ranks of its experts. ``topk_ids_TK``: global ids in ``[0, E)`` or -1
        (dropped slot); ``topk_weights_TK``: ``[T, K]`` floating weights. Differentiable in x and the
        weights."""

    @abstractmethod
    def combine(self, y_RD: torch.Tensor, handle: Any) -> torch.Tensor:
        """``[R, D]`` expert outputs, one per received row -> ``[T, D]``: each token's rows summed over
        ranks (fp32, rank order), y's dtype. Differentiable in y."""

    def __deepcopy__(self, memo: dict) -> Communicator:
        """A communicator is a handle on its group, not data: a deep copy of a layer shares it."""
        return self

    def local_experts(self, num_experts: int) -> range:
        """Global ids of the experts this rank owns: a contiguous block of ``E / W``."""
        e = num_experts // self.world_size
        return range(self.rank * e, (self.rank + 1) * e)

    def check_dispatch_args(
        self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor, num_experts: int
    ) -> None:
        """The argument checks every ``dispatch`` shares (shapes, dtypes, E divisible by W). They read
        no values: the id range is checked where a transport reads the counts on the host anyway."""
        check_hidden(x_TD, "x")
        if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
            raise ValueError(f"num_experts={num_experts!r} must be a positive int")
        if num_experts % self.world_size:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by the EP world size {self.world_size}"
            )
        check_topk(topk_ids_TK, x_TD.shape[0], num_experts)
        if not isinstance(topk_weights_TK, torch.Tensor) or topk_weights_TK.shape != topk_ids_TK.shape:
            raise ValueError(
                f"topk_weights must be a tensor of topk_ids' shape {tuple(topk_ids_TK.shape)}, "
                f"got {getattr(topk_weights_TK, 'shape', type(topk_weights_TK).__name__)}"
            )
        if not topk_weights_TK.is_floating_point():
            raise TypeError(f"topk_weights must be a floating tensor, got {topk_weights_TK.dtype}")
        for name, t in (("topk_ids", topk_ids_TK), ("topk_weights", topk_weights_TK)):
            if t.device != x_TD.device:
                raise ValueError(f"{name} is on {t.device}, x on {x_TD.device}: both must be on one device")

    @staticmethod
    def check_combine_args(y_RD: torch.Tensor, handle: Any, handle_type: type) -> None:
        """``handle`` must be a ``handle_type`` (this communicator's), with a ``num_recv`` (R) attribute,
        and ``y_RD`` must be ``[R, D]``: one row per row its dispatch received."""
        if not isinstance(handle, handle_type):
            raise TypeError(
                f"handle must come from this communicator's dispatch ({handle_type.__name__}), "
                f"got {type(handle).__name__}"
            )
        num_recv = handle.num_recv
        if not isinstance(y_RD, torch.Tensor) or y_RD.dim() != 2 or y_RD.shape[0] != num_recv:
            raise ValueError(
                f"y must have shape [R={num_recv}, D] (one row per received row), "
                f"got {getattr(y_RD, 'shape', type(y_RD).__name__)}"
            )
