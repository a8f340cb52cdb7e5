"""The Communicator interface: expert-parallel ``dispatch`` / ``combine`` with autograd duality.

``dispatch`` sends each kept slot (token t, choice k) to the rank that owns expert ``topk_ids[t, k]``;
``combine`` brings the expert outputs back and sums a token's rows. Communicators move rows only: they
never apply routing weights (weights travel with the rows; the layer applies them) and never compute.

Received rows are in the canonical order: local expert, then source rank, then source token, then k.
Duality: dispatch's backward is a combine with the same handle (a token's row gradients are summed),
and combine's backward is a dispatch replayed from the handle.

Legend: T tokens (this rank), K top-k, N = T*K slots, E experts (global), e = E/W local experts,
D model dim, S rows sent by this rank, R rows received by this rank, W EP world size, X any row width.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import NamedTuple

import torch

from flashfusemoe.spec import check_hidden, check_topk

__all__ = ["Communicator", "DispatchHandle", "Dispatched", "sort_slots_by_expert"]


@dataclass(frozen=True)
class DispatchHandle:
    """State that ties a combine (and both backwards) to its dispatch.

    Attributes:
        num_tokens: T, tokens on this rank.
        top_k: K, slots per token.
        send_slots_S: int64 flat slot ids ``t*K + k`` of the rows this rank sends, in send order
            (destination rank, local expert, token, k). Dropped slots (id -1) are absent.
        send_splits: rows sent to each rank, length W.
        recv_splits: rows received from each rank, length W.
        canonical_to_arrival_R: arrival position of each canonical received row, or None when the
            arrival order is already canonical (W = 1).
        recv_counts_e: int64 rows received per local expert.
    """

    num_tokens: int
    top_k: int
    send_slots_S: torch.Tensor
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    canonical_to_arrival_R: torch.Tensor | None
    recv_counts_e: torch.Tensor

    @property
    def num_recv(self) -> int:
        """R, rows this rank received."""
        return sum(self.recv_splits)


class Dispatched(NamedTuple):
    """What ``dispatch`` returns. ``recv_weights_R`` is None when no weights were given."""

    recv_x_RD: torch.Tensor
    recv_weights_R: torch.Tensor | None
    recv_counts_e: torch.Tensor
    handle: DispatchHandle


class Communicator(ABC):
    """Moves slot rows between the W ranks of an expert-parallel group.

    Subclasses implement three data-movement primitives: ``plan`` (exchange routing metadata, build the
    handle), ``send`` (rows in send order -> received rows in canonical order) and ``send_back`` (its
    inverse). The public ``dispatch`` / ``combine`` add autograd and the slot bookkeeping on top, so
    every communicator gets the same semantics. A communicator keeps no per-call state on ``self``.
    """

    rank: int
    world_size: int

    @abstractmethod
    def plan(self, topk_ids_TK: torch.Tensor, num_experts: int) -> DispatchHandle:
        """Build the handle for routing ``topk_ids_TK`` (-1 = dropped slot) over ``num_experts``."""

    @abstractmethod
    def send(self, rows_SX: list[torch.Tensor], handle: DispatchHandle) -> list[torch.Tensor]:
        """Each tensor ``[S, X]`` in send order -> ``[R, X]`` in canonical received order."""

    @abstractmethod
    def send_back(self, rows_RX: list[torch.Tensor], handle: DispatchHandle) -> list[torch.Tensor]:
        """Inverse of ``send``: each ``[R, X]`` canonical -> ``[S, X]`` in this rank's send order."""

    def local_experts(self, num_experts: int) -> range:
        """Global ids of the experts this rank owns: a contiguous block of ``E / W``."""
        e = num_experts // self.world_size
        return range(self.rank * e, (self.rank + 1) * e)

    def check_plan_args(self, topk_ids_TK: torch.Tensor, num_experts: int) -> None:
        """Shared argument checks for ``plan`` implementations (syncs with the device once)."""
        if num_experts % self.world_size:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by the EP world size {self.world_size}"
            )
        check_topk(topk_ids_TK, topk_ids_TK.shape[0], num_experts)
        if topk_ids_TK.numel():
            lo, hi = topk_ids_TK.min().item(), topk_ids_TK.max().item()
            if lo < -1 or hi >= num_experts:
                raise ValueError(f"topk_ids must lie in [-1, num_experts={num_experts}), got [{lo}, {hi}]")

    def dispatch(
        self,
        x_TD: torch.Tensor,
        topk_ids_TK: torch.Tensor,
        topk_weights_TK: torch.Tensor | None = None,
        *,
        num_experts: int,
    ) -> Dispatched:
        """Send each kept slot's token row (and weight) to its expert's rank.

        Returns ``recv_x_RD`` (x's dtype), ``recv_weights_R`` (weights' dtype, or None),
        ``recv_counts_e`` (rows per local expert) and the handle for ``combine``.
        """
        check_hidden(x_TD, "x")
        check_topk(topk_ids_TK, x_TD.shape[0], num_experts)
        if topk_weights_TK is not None and topk_weights_TK.shape != topk_ids_TK.shape:
            raise ValueError(
                f"topk_weights must have topk_ids' shape {tuple(topk_ids_TK.shape)}, "
                f"got {tuple(topk_weights_TK.shape)}"
            )
        handle = self.plan(topk_ids_TK, num_experts)
        recv_x_RD, recv_w_R = _Dispatch.apply(self, handle, x_TD, topk_weights_TK)
        return Dispatched(recv_x_RD, recv_w_R, handle.recv_counts_e, handle)

    def combine(self, y_RD: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Return each received row to its source and sum a token's K rows (fp32 sum, y's dtype)."""
        if y_RD.dim() != 2 or y_RD.shape[0] != handle.num_recv:
            raise ValueError(f"y must have shape [R={handle.num_recv}, D], got {tuple(y_RD.shape)}")
        return _Combine.apply(self, handle, y_RD)


def sort_slots_by_expert(topk_ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept slots in (expert, token, k) order and the slot count per expert.

    Returns ``slots_S`` (int64 flat slot ids ``t*K + k``; dropped slots left out) and ``counts_E``.
    """
    E = num_experts
    ids_N = topk_ids_TK.reshape(-1).long()
    key_N = torch.where(ids_N >= 0, ids_N, E)  # dropped slots sort last
    order_N = torch.sort(key_N, stable=True).indices
    counts_E = torch.bincount(key_N, minlength=E + 1)[:E]
    return order_N[: int(counts_E.sum())], counts_E


def _token_rows(x_TX: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
    """Per-token rows ``[T, X]`` -> send-order rows ``[S, X]`` (a token repeated once per kept slot)."""
    return x_TX.index_select(0, torch.div(handle.send_slots_S, handle.top_k, rounding_mode="floor"))


def _slot_rows(rows_SX: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
    """Send-order rows ``[S, X]`` -> slot rows ``[N, X]``, zeros for dropped slots."""
    N = handle.num_tokens * handle.top_k
    out_NX = rows_SX.new_zeros((N, rows_SX.shape[1]))
    return out_NX.index_copy(0, handle.send_slots_S, rows_SX)


def _sum_slots(slots_NX: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
    """``[N, X]`` -> ``[T, X]``: a token's K rows summed in fp32, in k order, cast back."""
    T, K = handle.num_tokens, handle.top_k
    return slots_NX.view(T, K, slots_NX.shape[1]).sum(1, dtype=torch.float32).to(slots_NX.dtype)


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm, handle, x_TD, weights_TK):
        ctx.comm, ctx.handle, ctx.has_weights = comm, handle, weights_TK is not None
        rows = [_token_rows(x_TD, handle)]
        if weights_TK is not None:
            rows.append(weights_TK.reshape(-1, 1).index_select(0, handle.send_slots_S))
        recv = comm.send(rows, handle)
        ctx.recv_x_shape, ctx.x_dtype = recv[0].shape, x_TD.dtype
        return recv[0], (recv[1].squeeze(1) if weights_TK is not None else None)

    @staticmethod
    def backward(ctx, grad_recv_x_RD, grad_recv_w_R):
        comm, handle = ctx.comm, ctx.handle
        if grad_recv_x_RD is None:
            grad_recv_x_RD = torch.zeros(
                ctx.recv_x_shape, dtype=ctx.x_dtype, device=handle.send_slots_S.device
            )
        grads = [grad_recv_x_RD]
        if ctx.has_weights:
            if grad_recv_w_R is None:
                grad_recv_w_R = grad_recv_x_RD.new_zeros(handle.num_recv, dtype=torch.float32)
            grads.append(grad_recv_w_R.reshape(-1, 1))
        back = comm.send_back([g.contiguous() for g in grads], handle)
        grad_x_TD = _sum_slots(_slot_rows(back[0], handle), handle)
        grad_w_TK = None
        if ctx.has_weights:
            grad_w_TK = _slot_rows(back[1], handle).view(handle.num_tokens, handle.top_k)
        return None, None, grad_x_TD, grad_w_TK


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm, handle, y_RD):
        ctx.comm, ctx.handle = comm, handle
        (back_SD,) = comm.send_back([y_RD.contiguous()], handle)
        return _sum_slots(_slot_rows(back_SD, handle), handle)

    @staticmethod
    def backward(ctx, grad_y_TD):
        (grad_RD,) = ctx.comm.send([_token_rows(grad_y_TD.contiguous(), ctx.handle)], ctx.handle)
        return None, None, grad_RD
