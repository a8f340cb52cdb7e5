"""Routing metadata on the device, no host sync: where each slot goes in expert order.

Three kernels: a per-block expert histogram, its running sum over blocks per expert, then each slot's row
``expert_start[e] + (earlier blocks' slots of e) + (earlier slots of e in this block)``: a stable
(expert, token, k) order, the same as the reference's stable sort. Ids outside ``[0, E)`` (-1: dropped,
or an expert of another rank) get no row. The last kernel also writes the group bounds ``[0, ends...]``
and, when asked, each row's token: what QuACK's GEMMs read, so that no launch between the metadata and
the first GEMM reshapes them.

Legend: T tokens (or received rows), K top-k, N = T*K slots, E experts, E1 = E + 1 group bounds, B slot
blocks of BLOCK_N, M rows of the expert-order buffers (N, or a smaller bound on the kept slots).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from flashfusemoe.backends.triton.launch import cdiv, fast_launch, next_pow2

__all__ = ["RoutingMeta", "routing_metadata"]

BLOCK_N = 64


class RoutingMeta(NamedTuple):
    """``pos_TK`` int32 row of each slot (-1: no row); ``row_slot_M`` int32 slot of each row (rows past
    ``live`` unset); ``bounds_E1`` int32 ``[0, row ends per expert...]``; ``row_token_M`` int32 token of
    each row (``row_slot // K``; empty unless asked for)."""

    pos_TK: torch.Tensor
    row_slot_M: torch.Tensor
    bounds_E1: torch.Tensor
    row_token_M: torch.Tensor

    @property
    def offs_E(self) -> torch.Tensor:
        """Inclusive row ends per expert (a view)."""
        return self.bounds_E1[1:]

    @property
    def live(self) -> torch.Tensor:
        """The number of rows with an expert, ``[1]`` (a view)."""
        return self.bounds_E1[-1:]


@fast_launch
@triton.jit
def _histogram_kernel(ids_ptr, cnt_ptr, N, E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    slots = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)
    ids = tl.load(ids_ptr + slots, mask=slots < N, other=-1)
    counts = tl.sum((ids[:, None] == cols[None, :]).to(tl.int32), axis=0)
    tl.store(cnt_ptr + pid * E + cols, counts, mask=cols < E)


@fast_launch
@triton.jit
def _block_prefix_kernel(cnt_ptr, cum_ptr, B, E: tl.constexpr, BLOCK_B: tl.constexpr):
    """Inclusive running sum over blocks of one expert's counts (one program per expert)."""
    e = tl.program_id(0)
    running = 0
    for b0 in range(0, B, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        c = tl.load(cnt_ptr + bs * E + e, mask=bs < B, other=0)
        tl.store(cum_ptr + bs * E + e, tl.cumsum(c, axis=0) + running, mask=bs < B)
        running += tl.sum(c, axis=0)


@fast_launch
@triton.jit
def _positions_kernel(
    ids_ptr,
    cum_ptr,
    pos_ptr,
    row_slot_ptr,
    row_token_ptr,
    bounds_ptr,
    N,
    M,
    B,
    K,
    E: tl.constexpr,
    TOKENS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    slots = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    totals = tl.load(cum_ptr + (B - 1) * E + cols, mask=col_ok, other=0)  # inclusive cumsum: last row
    expert_end = tl.cumsum(totals, axis=0)
    before_block = tl.load(cum_ptr + tl.maximum(pid - 1, 0) * E + cols, mask=col_ok, other=0)
    before_block = tl.where(pid > 0, before_block, 0)
    base = expert_end - totals + before_block
    ids = tl.load(ids_ptr + slots, mask=slots < N, other=-1)
    onehot = (ids[:, None] == cols[None, :]).to(tl.int32)
    rank = tl.cumsum(onehot, axis=0) - onehot  # earlier slots of the same expert in this block
    pos = tl.sum(onehot * (base[None, :] + rank), axis=1)
    # A row past M (a wrong bound) is dropped rather than written out of bounds.
    has_row = (ids >= 0) & (ids < E) & (pos < M)
    pos = tl.where(has_row, pos, -1)
    tl.store(pos_ptr + slots, pos, mask=slots < N)
    tl.store(row_slot_ptr + pos, slots, mask=(slots < N) & has_row)
    if TOKENS:
        tl.store(row_token_ptr + pos, slots // K, mask=(slots < N) & has_row)
    if pid == 0:
        tl.store(bounds_ptr + 1 + cols, tl.minimum(expert_end, M), mask=col_ok)
        tl.store(bounds_ptr, 0)


def routing_metadata(
    topk_ids_TK: torch.Tensor, num_experts: int, num_rows: int | None = None, row_tokens: bool = False
) -> RoutingMeta:
    """Expert-order layout of the slots of ``topk_ids_TK`` whose id lies in ``[0, E)``, in buffers of
    ``num_rows`` rows (default T*K): at least the number of such slots. ``row_tokens``: also each
    row's token."""
    T, K = topk_ids_TK.shape
    N, E = T * K, num_experts
    M = N if num_rows is None else num_rows
    dev = topk_ids_TK.device
    ids_N = topk_ids_TK.reshape(-1).to(torch.int32)
    B = max(cdiv(N, BLOCK_N), 1)
    BLOCK_E = next_pow2(E)
    pos = torch.empty((N,), dtype=torch.int32, device=dev)
    row_slot = torch.empty((M,), dtype=torch.int32, device=dev)
    row_token = torch.empty((M if row_tokens else 0,), dtype=torch.int32, device=dev)
    if not N:
        bounds = torch.zeros((E + 1,), dtype=torch.int32, device=dev)
    else:  # every kernel writes all of its output: no zero-fill launches
        bounds = torch.empty((E + 1,), dtype=torch.int32, device=dev)
        counts_BE, cum_BE = torch.empty((2, B, E), dtype=torch.int32, device=dev)
        _histogram_kernel[(B,)](ids_N, counts_BE, N, E=E, BLOCK_N=BLOCK_N, BLOCK_E=BLOCK_E)
        _block_prefix_kernel[(E,)](counts_BE, cum_BE, B, E=E, BLOCK_B=min(next_pow2(B), 1024))
        _positions_kernel[(B,)](
            ids_N, cum_BE, pos, row_slot, row_token if row_tokens else row_slot, bounds, N, M, B, K,
            E=E, TOKENS=row_tokens, BLOCK_N=BLOCK_N, BLOCK_E=BLOCK_E,
        )  # fmt: skip
    return RoutingMeta(pos.view(T, K), row_slot, bounds, row_token)
