"""Packed all-to-all communicators: one row per (token, destination rank), ids and weights beside it.

Subclasses supply the transport (``_all_to_all``, private to them); this module owns the row
bookkeeping every all-to-all transport shares (``nccl`` over torch.distributed, ``fake`` threads).

A dispatch, in launch order (what the host waits for, and what runs before it does):
1. device: each slot's destination rank, rows and slots per rank; the counts all-to-all (with each
   rank's bad-id flag, so that all ranks raise together); an async copy of the split sizes and flags
   into pinned host memory, with an event.
2. device, launched before the host waits: the send positions, and each token's row packed once into
   one byte buffer ``[T, B]`` (x, its K global ids as int32, its K weights).
3. host: waits on the event and reads the split sizes (the only host sync of a step; none in
   ``sync_free`` mode).
4. device: the rows in send order (destination rank, then token), one payload all-to-all, unpack; the
   receiver turns global ids into local ones (-1 for experts elsewhere).
``combine`` and both backwards reuse the handle's split sizes: one payload all-to-all each, no sync.

``sync_free=True``: every token goes to every rank (worst-case buffers), so no counts are exchanged
and the host reads nothing: capturable in a CUDA graph on a graph-safe transport. Costs W*T rows per
dispatch instead of one per (token, destination) (bytes below), the experts' buffers sized for W*T*K
slots, and every rank must have the same T.

Legend: T tokens, K top-k, E experts, e = E/W local experts, W EP world size, D model dim, S rows sent,
R rows received, B packed bytes per row, X any row width.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flashfusemoe.comm.base import Communicator, Dispatched
from flashfusemoe.spec import check_first_order

__all__ = ["AllToAllCommunicator", "AllToAllHandle", "dispatch_bytes"]


@dataclass(frozen=True)
class AllToAllHandle:
    """State that ties a combine (and both backwards) to its dispatch.

    Attributes:
        num_tokens: T, tokens on this rank.
        experts_per_rank: e.
        send_token_S: int64 ``[S]``, the token of each sent row, in send order (destination rank, then
            token).
        send_row_TW1: int64 ``[T, W+1]``, the sent row that carries token t to rank w, or S where it
            goes nowhere; column W is always S (the target of dropped slots).
        dest_rank_TK: int64 ``[T, K]``, the rank of each slot's expert, W for a dropped slot.
        send_splits: rows sent to each rank (host ints), length W.
        recv_splits: rows received from each rank (host ints), length W.
    """

    num_tokens: int
    experts_per_rank: int
    send_token_S: torch.Tensor
    send_row_TW1: torch.Tensor
    dest_rank_TK: torch.Tensor
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]

    @property
    def num_sent(self) -> int:
        """S, rows this rank sent."""
        return sum(self.send_splits)

    @property
    def num_recv(self) -> int:
        """R, rows this rank received."""
        return sum(self.recv_splits)


def dispatch_bytes(
    topk_ids_TK: torch.Tensor,
    num_experts: int,
    world_size: int,
    row_bytes: int,
    *,
    rank: int | None = None,
    per_slot: bool = False,
) -> int:
    """Bytes one dispatch of this routing sends: one packed row of ``row_bytes`` per (token,
    destination rank), or per kept slot with ``per_slot`` (a slot-per-row transport). With ``rank``
    (the sender), rows to itself do not count: only what crosses to other ranks."""
    kept_TK = topk_ids_TK >= 0
    dest_N = topk_ids_TK[kept_TK].long() // (num_experts // world_size)
    token_N = kept_TK.nonzero()[:, 0]
    if not per_slot:
        pair_N = torch.unique(token_N * world_size + dest_N)
        dest_N = pair_N % world_size
    if rank is not None:
        dest_N = dest_N[dest_N != rank]
    return int(dest_N.numel()) * row_bytes


def _pack(rows: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[torch.dtype, int]]]:
    """``[N, X_i]`` tensors of any dtypes -> one ``[N, B]`` byte tensor, so that a move is one exchange."""
    layout = [(r.dtype, r.shape[1]) for r in rows]
    N, B = rows[0].shape[0], sum(width * dtype.itemsize for dtype, width in layout)
    if N == 0:  # an empty tensor's strides may not allow a dtype view
        return torch.empty((0, B), dtype=torch.uint8, device=rows[0].device), layout
    return torch.cat([r.contiguous().view(torch.uint8) for r in rows], dim=1), layout


def _unpack(packed_NB: torch.Tensor, layout: list[tuple[torch.dtype, int]]) -> list[torch.Tensor]:
    out, col = [], 0
    for dtype, width in layout:
        nbytes = width * dtype.itemsize
        if packed_NB.shape[0] == 0:
            out.append(torch.empty((0, width), dtype=dtype, device=packed_NB.device))
        else:
            out.append(packed_NB[:, col : col + nbytes].contiguous().view(dtype))
        col += nbytes
    return out


def _host_read(values: torch.Tensor) -> Callable[[], list[int]]:
    """Start copying ``values`` to the host; the returned call waits for them (pinned memory and an
    event on CUDA, so the device work launched in between is not waited for)."""
    if values.device.type != "cuda":
        return values.tolist
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def read() -> list[int]:
        done.synchronize()
        return host.tolist()

    return read


def _sum_over_ranks(rows_SX: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
    """Send-order rows ``[S, X]`` -> ``[T, X]``: a token's rows summed in fp32 in rank order, cast back."""
    T, X = handle.num_tokens, rows_SX.shape[1]
    padded = torch.cat([rows_SX, rows_SX.new_zeros((1, X))])  # row S: zeros, for ranks a token skips
    acc_TX = torch.zeros((T, X), dtype=torch.float32, device=rows_SX.device)
    for w in range(handle.send_row_TW1.shape[1] - 1):
        acc_TX += padded.index_select(0, handle.send_row_TW1[:, w])
    return acc_TX.to(rows_SX.dtype)


class AllToAllCommunicator(Communicator):
    """Dispatch by one all-to-all of packed rows, one row per (token, destination rank).

    Attributes: ``rank``, ``world_size``, ``sync_free`` (set by the subclass)."""

    sync_free: bool = False

    @abstractmethod
    def _all_to_all(
        self, send_SX: torch.Tensor, send_splits: tuple[int, ...], recv_splits: tuple[int, ...], what: str
    ) -> torch.Tensor:
        """Rows ``send_SX[sum(send_splits[:w]) : ...]`` go to rank w; returns the ``[R, X]`` rows
        received, source rank by source rank. ``what`` names the step, for error messages."""

    def _layout(self, topk_ids_TK: torch.Tensor, num_experts: int):
        """Step 1, launched: ``(goes_WT, send_row_TW1, dest_TK, finish)``, where ``goes_WT`` flags each
        (destination rank, token) pair that sends a row and ``finish() -> (send_splits, recv_splits,
        num_recv_slots)`` is step 3, the host's wait."""
        W, e = self.world_size, num_experts // self.world_size
        T, K = topk_ids_TK.shape
        ids_TK = topk_ids_TK.long()
        # an id outside [0, E) goes nowhere (-1: dropped; others: an error below)
        dest_TK = torch.where((ids_TK >= 0) & (ids_TK < num_experts), ids_TK.div(e, rounding_mode="floor"), W)
        bad = ((ids_TK < -1) | (ids_TK >= num_experts)).any()
        if self.sync_free:  # nothing is read on the host: a bad id stops the device instead
            torch._assert_async(~bad, f"topk_ids must lie in [-1, num_experts={num_experts})")
            goes_TW = torch.ones((T, W), dtype=torch.bool, device=ids_TK.device)
        else:
            slots_TW = torch.zeros((T, W + 1), dtype=torch.int64, device=ids_TK.device)
            slots_TW = slots_TW.scatter_add_(1, dest_TK, torch.ones_like(dest_TK))[:, :W]
            goes_TW = slots_TW > 0
            # [rows, slots, bad-id flag] per destination: every rank learns of a bad rank, none hangs
            counts_W3 = torch.stack([goes_TW.sum(0), slots_TW.sum(0), bad.long().expand(W)], dim=1)
            ones = (1,) * W
            recv_W3 = self._all_to_all(counts_W3, ones, ones, "dispatch counts")
            extremes = torch.stack(ids_TK.aminmax()) if ids_TK.numel() else ids_TK.new_full((2,), -1)
            read = _host_read(torch.cat([counts_W3[:, 0], recv_W3.reshape(-1), extremes]))
        goes_WT = goes_TW.t().reshape(-1)  # send order: destination rank, then token
        S_dev = goes_WT.sum()
        pos_WT = goes_WT.cumsum(0).view(W, T) - 1
        send_row_TW1 = torch.cat([torch.where(goes_TW, pos_WT.t(), S_dev), S_dev.expand(T, 1)], dim=1)

        def finish() -> tuple[tuple[int, ...], tuple[int, ...], int]:
            if self.sync_free:
                return (T,) * W, (T,) * W, W * T * K
            host = read()
            send, recv, (lo, hi) = host[:W], host[W : 4 * W], host[4 * W :]
            bad_ranks = [src for src in range(W) if recv[3 * src + 2]]
            if bad_ranks:
                mine = f"; here [{lo}, {hi}]" if self.rank in bad_ranks else ""
                raise ValueError(
                    f"topk_ids must lie in [-1, num_experts={num_experts}): rank(s) {bad_ranks} passed "
                    f"ids outside it{mine}"
                )
            return tuple(send), tuple(recv[0::3]), sum(recv[1::3])

        return goes_WT, send_row_TW1, dest_TK, finish

    @torch.compiler.disable  # host reads and collectives: kept out of compiled graphs, run eagerly
    def dispatch(
        self,
        x_TD: torch.Tensor,
        topk_ids_TK: torch.Tensor,
        topk_weights_TK: torch.Tensor,
        *,
        num_experts: int,
    ) -> Dispatched:
        self.check_dispatch_args(x_TD, topk_ids_TK, topk_weights_TK, num_experts)
        layout = self._layout(topk_ids_TK, num_experts)
        recv_x, recv_ids, recv_w, handle, num_slots = _Dispatch.apply(
            self, layout, num_experts, x_TD, topk_ids_TK, topk_weights_TK
        )
        return Dispatched(recv_x, recv_ids, recv_w, handle, num_slots)

    @torch.compiler.disable
    def combine(self, y_RD: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        self.check_combine_args(y_RD, handle, AllToAllHandle)
        return _Combine.apply(self, handle, y_RD)


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm, layout, num_experts, x_TD, ids_TK, weights_TK):
        goes_WT, send_row_TW1, dest_TK, finish = layout
        T, K = ids_TK.shape
        tokens_TB, row_layout = _pack([x_TD, ids_TK.to(torch.int32), weights_TK])  # step 2
        send_splits, recv_splits, num_slots = finish()  # step 3
        S = sum(send_splits)
        send_token_S = torch.nonzero_static(goes_WT, size=S)[:, 0] % max(T, 1)
        handle = AllToAllHandle(
            T, num_experts // comm.world_size, send_token_S, send_row_TW1, dest_TK, send_splits, recv_splits
        )
        recv_RB = comm._all_to_all(
            tokens_TB.index_select(0, send_token_S), send_splits, recv_splits, "dispatch"
        )
        recv_x_RD, ids_RK, w_RK = _unpack(recv_RB, row_layout)
        e = handle.experts_per_rank
        local_RK = ids_RK - comm.rank * e
        mine_RK = (local_RK >= 0) & (local_RK < e)  # -1 (dropped) never lands in [0, e) on any rank
        recv_ids_RK = torch.where(mine_RK, local_RK, -1).to(ids_TK.dtype)
        recv_w_RK = torch.where(mine_RK, w_RK, 0.0)
        ctx.comm, ctx.handle = comm, handle
        ctx.x_meta, ctx.w_meta = (x_TD.dtype, x_TD.shape[1]), (weights_TK.dtype, K)
        ctx.mark_non_differentiable(recv_ids_RK)
        return recv_x_RD, recv_ids_RK, recv_w_RK, handle, num_slots

    @staticmethod
    def backward(ctx, grad_x_RD, _ids, grad_w_RK, _handle, _slots):
        """A combine: row gradients summed per token over ranks, each weight gradient taken from the
        one rank that holds its slot's expert."""
        check_first_order("expert-parallel dispatch")
        handle, R = ctx.handle, ctx.handle.num_recv
        (x_dtype, D), (w_dtype, K) = ctx.x_meta, ctx.w_meta
        dev = handle.send_row_TW1.device
        if grad_x_RD is None:
            grad_x_RD = torch.zeros((R, D), dtype=x_dtype, device=dev)
        if grad_w_RK is None:
            grad_w_RK = torch.zeros((R, K), dtype=w_dtype, device=dev)
        packed_RB, layout = _pack([grad_x_RD, grad_w_RK])
        back_SB = ctx.comm._all_to_all(packed_RB, handle.recv_splits, handle.send_splits, "dispatch backward")
        grad_x_SD, grad_w_SK = _unpack(back_SB, layout)
        grad_x_TD = _sum_over_ranks(grad_x_SD, handle)
        row_TK = handle.send_row_TW1.gather(1, handle.dest_rank_TK)  # S (zeros) for dropped slots
        padded_w = torch.cat([grad_w_SK, grad_w_SK.new_zeros((1, K))])
        grad_w_TK = padded_w[row_TK, torch.arange(K, device=dev)]
        return None, None, None, grad_x_TD, None, grad_w_TK


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm, handle, y_RD):
        ctx.comm, ctx.handle = comm, handle
        back_SD = comm._all_to_all(y_RD.contiguous(), handle.recv_splits, handle.send_splits, "combine")
        return _sum_over_ranks(back_SD, handle)

    @staticmethod
    def backward(ctx, grad_out_TD):
        """A dispatch of the output gradient, replayed from the handle (no counts exchange)."""
        check_first_order("expert-parallel combine")
        handle = ctx.handle
        rows_SD = grad_out_TD.contiguous().index_select(0, handle.send_token_S)
        grad_RD = ctx.comm._all_to_all(rows_SD, handle.send_splits, handle.recv_splits, "combine backward")
        return None, None, grad_RD
