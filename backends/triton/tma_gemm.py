"""Persistent grouped GEMMs on Hopper's tensor-memory accelerator (TMA), optionally with the expert
activation in the epilogue.

- ``tma_grouped_mm(a [M, K], b [E, K, N], offs)``: rows ``[offs[e-1], offs[e])`` of ``a`` times ``b[e]``;
  with ``activation`` it also returns ``act(h)`` (GLU: ``act(gate) * up`` over h's two column halves),
  computed from the rounded ``h`` in the tile's epilogue, so ``h`` is never read back; with
  ``gather = (idx, div)`` row r reads ``a[idx[r] // div]`` (pointer loads: Hopper's TMA has no row
  gather), so token rows need no permuted copy.
- ``tma_grouped_wgrad(a [M, P], b [M, Q], offs)``: ``out[e] = a_e.T @ b_e`` (zeros for an empty group),
  or added into a given ``out`` (a gradient buffer) in the epilogue.

One program per SM walks the output tiles (row tiles grouped by expert, ``GROUP_M`` row tiles per
column sweep for L2 reuse). Operands are loaded by TMA through descriptors built on the device: ``a``
as one ``[M, K]`` descriptor (rows past a group's end belong to the next group and are simply not
stored), ``b`` as a 3-D ``[E, ., .]`` descriptor, so a tile never reads another expert's weights; the
weight gradient uses one ``[end_e, .]`` descriptor per group, whose zero fill past the group's end
masks the next group's rows. GLU tiles load gate and up rows as one box of ``b`` viewed
``[E, 2, I, K]``. Stores are masked pointer stores (a TMA store could overwrite the next
group's rows). Needs 16-byte aligned bases and row strides and unit column strides (``tma_ok``).

Legend: M rows (expert-sorted), E experts (groups), K/P/Q/N matrix dims, I = activation columns
(N/2 for GLU, else N), offs int32 inclusive row ends.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

try:  # on-device TMA descriptors and the scratch allocator they need: Triton >= 3.4
    from triton.runtime import _allocation

    _HAVE_TMA = hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")
except ImportError:
    _HAVE_TMA = False

from flashfusemoe.backends.triton.activation import ACT_CODES, _act_and_grad
from flashfusemoe.backends.triton.launch import cdiv, fast_launch, next_pow2
from flashfusemoe.spec import is_glu

__all__ = ["glu_halves_ok", "tma_grouped_mm", "tma_grouped_wgrad", "tma_layout_ok", "tma_ok"]


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global scratch for on-device descriptors, from PyTorch's caching allocator (graph-capturable)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    # Triton's allocator is per thread context (autograd runs backward on its own threads); set ours
    # only where none is set, so a caller's own allocator wins.
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


_SMS: dict[int, int] = {}


def _num_programs(device: torch.device) -> int:
    """One program per SM (a few under the interpreter, enough to exercise the persistent loop)."""
    if device.type != "cuda":
        return 3
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


_HOPPER: dict[int, bool] = {}


def tma_layout_ok(t: torch.Tensor) -> bool:
    """16-byte aligned base, one unit stride (the last; or the middle one of a 3-D ``b`` stored
    K-major) and every other stride a multiple of 16 bytes: what a TMA descriptor can describe."""
    strides = t.stride()
    unit = len(strides) - 1 if strides[-1] == 1 else 1 if t.dim() == 3 and strides[1] == 1 else None
    if unit is None or t.data_ptr() % 16:
        return False
    return not any((s * t.element_size()) % 16 for i, s in enumerate(strides) if i != unit)


def glu_halves_ok(b_EKN: torch.Tensor, activation: str | None) -> bool:
    """A GLU epilogue views b's N columns as two halves: with N contiguous, the half's offset must be a
    multiple of 16 bytes too."""
    if activation is None or not is_glu(activation) or b_EKN.stride(1) == 1:
        return True
    return (b_EKN.shape[2] // 2 * b_EKN.element_size()) % 16 == 0


def tma_ok(*tensors: torch.Tensor) -> bool:
    """A Triton with TMA descriptors; non-empty CUDA tensors on Hopper or newer, 16-bit, each
    ``tma_layout_ok``. (fp32 runs these kernels only in the interpreter's tests: its exact dot is
    1.5-18x slower here than in the pointer-load kernels, measured on H100.)"""
    if not _HAVE_TMA:
        return False
    for t in tensors:
        if not t.is_cuda or t.dtype not in (torch.bfloat16, torch.float16) or t.numel() == 0:
            return False
        index = t.device.index
        if index not in _HOPPER:
            _HOPPER[index] = torch.cuda.get_device_capability(t.device) >= (9, 0)
        if not _HOPPER[index] or not tma_layout_ok(t):
            return False
    return True


@triton.jit
def _load_b(b_desc, expert, n0, k0, B_KMAJOR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The ``[BLOCK_K, BLOCK_N]`` tile of ``b[expert]`` at (k0, n0), from either storage order."""
    if B_KMAJOR:
        return b_desc.load([expert, n0, k0]).reshape(BLOCK_N, BLOCK_K).T
    return b_desc.load([expert, k0, n0]).reshape(BLOCK_K, BLOCK_N)


@triton.jit
def _load_b_glu(b_desc, expert, j0, k0, B_KMAJOR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[BLOCK_K, 2 * BLOCK_N]``: gate columns ``j0 + [0, BLOCK_N)`` then the same up columns, one
    TMA box over b viewed with the halves as their own dimension, so one dot computes both (two dots
    per step pipelined poorly: 1.3-1.5x slower on H100)."""
    if B_KMAJOR:
        return b_desc.load([expert, 0, j0, k0]).reshape(2 * BLOCK_N, BLOCK_K).T
    return b_desc.load([expert, k0, 0, j0]).reshape(BLOCK_K, 2 * BLOCK_N)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:  # fp32 operands: exact products, as the reference computes them
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _tile(ptr, stride, rows, row_end, cols, col_end):
    """Pointers and mask of a tile of a row-major matrix (unit column stride)."""
    mask = (rows < row_end)[:, None] & (cols < col_end)[None, :]
    return ptr + rows[:, None].to(tl.int64) * stride + cols[None, :], mask


@triton.jit
def _store_tile(ptr, stride, rows, row_end, cols, col_end, val):
    ptrs, mask = _tile(ptr, stride, rows, row_end, cols, col_end)
    tl.store(ptrs, val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _plus_tile(acc, ptr, stride, rows, row_end, cols, col_end):
    """``acc`` plus the stored tile (fp32): a gradient added into its buffer with one rounding."""
    ptrs, mask = _tile(ptr, stride, rows, row_end, cols, col_end)
    return acc + tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@fast_launch
@triton.jit
def _tma_mm_kernel(
    a_ptr,
    b_ptr,
    h_ptr,
    act_ptr,
    offs_ptr,
    idx_ptr,
    M,
    N,
    K,
    E,
    s_am,
    s_be,
    s_b1,
    s_hm,
    s_actm,
    B_KMAJOR: tl.constexpr,
    GATHER: tl.constexpr,
    ACT: tl.constexpr,
    GLU: tl.constexpr,
    IEEE: tl.constexpr,
    NUM_PROGS: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    H_TMA: tl.constexpr,
):
    # Row tiles of every expert, in expert order: loop-invariant, computed once per program.
    es = tl.arange(0, BLOCK_E)
    ends = tl.load(offs_ptr + es, mask=es < E, other=0)
    starts = tl.load(offs_ptr + es - 1, mask=(es > 0) & (es < E), other=0)
    n_tiles = tl.where(es < E, tl.cdiv(ends - starts, BLOCK_M), 0)
    tiles_end = tl.cumsum(n_tiles, axis=0)
    tiles_start = tiles_end - n_tiles
    num_m = tl.sum(n_tiles, axis=0)
    I = N // 2 if GLU else N  # GLU: a column tile pairs gate columns j with up columns I + j
    num_n = tl.cdiv(I, BLOCK_N)
    if GATHER == 0:
        a_desc = tl.make_tensor_descriptor(
            a_ptr, shape=[M, K], strides=[s_am, 1], block_shape=[BLOCK_M, BLOCK_K]
        )
    if GLU and B_KMAJOR:  # [E, 2, I, K]
        b_desc = tl.make_tensor_descriptor(
            b_ptr, shape=[E, 2, I, K], strides=[s_be, I * s_b1, s_b1, 1], block_shape=[1, 2, BLOCK_N, BLOCK_K]
        )
    elif GLU:  # [E, K, 2, I]
        b_desc = tl.make_tensor_descriptor(
            b_ptr, shape=[E, K, 2, I], strides=[s_be, s_b1, I, 1], block_shape=[1, BLOCK_K, 2, BLOCK_N]
        )
    elif B_KMAJOR:
        b_desc = tl.make_tensor_descriptor(
            b_ptr, shape=[E, N, K], strides=[s_be, s_b1, 1], block_shape=[1, BLOCK_N, BLOCK_K]
        )
    else:
        b_desc = tl.make_tensor_descriptor(
            b_ptr, shape=[E, K, N], strides=[s_be, s_b1, 1], block_shape=[1, BLOCK_K, BLOCK_N]
        )
    if H_TMA:  # GLU's h of whole row tiles (a partial tile's rows past its group belong to the next one)
        h_desc = tl.make_tensor_descriptor(
            h_ptr, shape=[M, 2, I], strides=[s_hm, I, 1], block_shape=[BLOCK_M, 2, BLOCK_N]
        )
    HALVES: tl.constexpr = 2 if GLU else 1
    # Triton 3.6 cannot fuse the nested loops around a descriptor store under a branch
    FLATTEN: tl.constexpr = not H_TMA
    in_group = GROUP_M * num_n
    for t in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGS, flatten=FLATTEN):
        first_m = (t // in_group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + t % size_m
        col0 = ((t % in_group) // size_m) * BLOCK_N
        hit = (pid_m >= tiles_start) & (pid_m < tiles_end)
        expert = tl.max(tl.where(hit, es, -1), axis=0)
        row0 = tl.sum(tl.where(hit, starts + (pid_m - tiles_start) * BLOCK_M, 0), axis=0)
        row_end = tl.sum(tl.where(hit, ends, 0), axis=0)
        rows = row0 + tl.arange(0, BLOCK_M)
        if GATHER:  # row r reads a's row idx[r] // GATHER (TMA has no row gather on Hopper)
            src = tl.load(idx_ptr + rows, mask=rows < row_end, other=0) // GATHER
            a_rows = a_ptr + src[:, None].to(tl.int64) * s_am
            ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, HALVES * BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if GATHER:
                a_mask = (rows < row_end)[:, None] & (k0 + ks < K)[None, :]
                a = tl.load(a_rows + (k0 + ks)[None, :], mask=a_mask, other=0.0)
            else:
                a = a_desc.load([row0, k0])
            if GLU:
                b = _load_b_glu(b_desc, expert, col0, k0, B_KMAJOR, BLOCK_N, BLOCK_K)
            else:
                b = _load_b(b_desc, expert, col0, k0, B_KMAJOR, BLOCK_N, BLOCK_K)
            acc = _dot(a, b, acc, IEEE)
        cols = col0 + tl.arange(0, BLOCK_N)
        # The activation reads h as stored (rounded), exactly as the backward will.
        h = acc.to(h_ptr.dtype.element_ty)
        if GLU:
            h3 = h.reshape(BLOCK_M, 2, BLOCK_N)
            if H_TMA and row0 + BLOCK_M <= row_end:
                h_desc.store([row0, 0, col0], h3)
            else:
                halves = tl.arange(0, 2) * I
                ptrs = (
                    h_ptr
                    + rows[:, None, None].to(tl.int64) * s_hm
                    + halves[None, :, None]
                    + cols[None, None, :]
                )
                mask = (rows < row_end)[:, None, None] & (cols < I)[None, None, :]
                tl.store(ptrs, h3, mask=mask)
            gate, up = tl.split(h3.permute(0, 2, 1))
            f, _ = _act_and_grad(gate.to(tl.float32), ACT)
            _store_tile(act_ptr, s_actm, rows, row_end, cols, I, f * up.to(tl.float32))
        else:
            _store_tile(h_ptr, s_hm, rows, row_end, cols, N, h)
            if ACT >= 0:
                f, _ = _act_and_grad(h.to(tl.float32), ACT)
                _store_tile(act_ptr, s_actm, rows, row_end, cols, N, f)


@fast_launch
@triton.jit
def _tma_wgrad_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    offs_ptr,
    P,
    Q,
    E,
    s_am,
    s_bm,
    s_ce,
    s_cp,
    ACCUMULATE: tl.constexpr,
    IEEE: tl.constexpr,
    NUM_PROGS: tl.constexpr,
    GROUP_P: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    num_p = tl.cdiv(P, BLOCK_P)
    num_q = tl.cdiv(Q, BLOCK_Q)
    per_e = num_p * num_q
    in_group = GROUP_P * num_q
    for t in tl.range(tl.program_id(0), E * per_e, NUM_PROGS):  # expert-major: tiles share a_e, b_e in L2
        expert = t // per_e
        # GROUP_P row strips sweep the columns together, so b_e's column tiles are read once per group
        # (b_e is larger than L2 at Mixtral-like shapes)
        local = t % per_e
        first_p = (local // in_group) * GROUP_P
        size_p = tl.minimum(num_p - first_p, GROUP_P)
        p0 = (first_p + local % size_p) * BLOCK_P
        q0 = ((local % in_group) // size_p) * BLOCK_Q
        start = tl.load(offs_ptr + expert - 1, mask=expert > 0, other=0)
        end = tl.load(offs_ptr + expert)
        rows = tl.maximum(end, 1)  # a descriptor needs a non-empty shape; an empty group loads nothing
        a_desc = tl.make_tensor_descriptor(
            a_ptr, shape=[rows, P], strides=[s_am, 1], block_shape=[BLOCK_K, BLOCK_P]
        )
        b_desc = tl.make_tensor_descriptor(
            b_ptr, shape=[rows, Q], strides=[s_bm, 1], block_shape=[BLOCK_K, BLOCK_Q]
        )
        acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
        for m0 in range(start, end, BLOCK_K):
            a = a_desc.load([m0, p0])
            b = b_desc.load([m0, q0])
            acc = _dot(a.T, b, acc, IEEE)
        c_e = c_ptr + expert.to(tl.int64) * s_ce
        ps, qs = p0 + tl.arange(0, BLOCK_P), q0 + tl.arange(0, BLOCK_Q)
        if ACCUMULATE:
            acc = _plus_tile(acc, c_e, s_cp, ps, P, qs, Q)
        _store_tile(c_e, s_cp, ps, P, qs, Q, acc)


def _tiles(dtype: torch.dtype, glu: bool, aligned_out: bool = True) -> tuple[int, int, int, int, int]:
    """(rows, cols, depth, warps, stages): 128x256x64 for 16-bit operands (a GLU tile: 128 gate and the
    same 128 up columns), the best of a sweep on H100 at the benchmark shapes (GLU: 4 stages, 3-8%
    faster than 3 at fine-grained and Qwen2-like shapes; 7 other GLU tiles were slower); small tiles
    for fp32 (exact dot on FMA units, 4-byte shared memory; the interpreter's tests).

    ``aligned_out`` False (an output row stride or the GLU half width not a multiple of 16 elements):
    Triton then stages the GLU epilogue's stores through 64 KiB of shared memory, which with 4 stages
    of 48 KiB exceeds Hopper's 227 KiB (seen at I = 20 on an H200): 3 stages."""
    if dtype == torch.float32:
        return 64, 32 if glu else 64, 32, 4, 2
    if glu:
        return (128, 128, 64, 8, 4) if aligned_out else (128, 128, 64, 8, 3)
    return 128, 256, 64, 8, 3


def tma_grouped_mm(
    a_MK: torch.Tensor,
    b_EKN: torch.Tensor,
    offs_E: torch.Tensor,
    activation: str | None = None,
    gather: tuple[torch.Tensor, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(h [M, N], act [M, I])``: ``h`` = row group e of ``a`` times ``b[e]``, ``act`` = its activation
    (None without ``activation``); rows past ``offs[-1]`` are left unwritten. ``b`` may be stored
    K-major (``b.stride(1) == 1``) or N-major (``b.stride(2) == 1``). With ``gather = (idx_M, div)``
    row r of the product reads row ``idx[r] // div`` of ``a`` (``[*, K]``), which is never permuted in
    memory, and the result has ``len(idx)`` rows."""
    M, K = a_MK.shape if gather is None else (gather[0].shape[0], a_MK.shape[1])
    E, _, N = b_EKN.shape
    glu = activation is not None and is_glu(activation)
    I = N // 2 if glu else N
    h_MN = a_MK.new_empty((M, N))
    act_MI = a_MK.new_empty((M, I)) if activation is not None else None
    kmajor = b_EKN.stride(1) == 1
    if M and N and K:
        _ensure_allocator()
        aligned = N % 16 == 0 and I % 16 == 0
        BM, BN, BK, warps, stages = _tiles(a_MK.dtype, glu, aligned)
        h_tma = _h_by_tma(glu, aligned, K, gather is not None)
        stages = min(stages, 3) if h_tma else stages  # 4 stages + the h tile: 294 KB > 227 KB (H200)
        progs = min(_num_programs(a_MK.device), (cdiv(M, BM) + E) * cdiv(I, BN))
        _tma_mm_kernel[(progs,)](
            a_MK,
            b_EKN,
            h_MN,
            act_MI if act_MI is not None else h_MN,
            offs_E,
            gather[0] if gather is not None else offs_E,
            M,
            N,
            K,
            E,
            a_MK.stride(0),
            b_EKN.stride(0),
            b_EKN.stride(2) if kmajor else b_EKN.stride(1),
            h_MN.stride(0),
            act_MI.stride(0) if act_MI is not None else 0,
            B_KMAJOR=kmajor,
            GATHER=gather[1] if gather is not None else 0,
            ACT=ACT_CODES[activation] if activation is not None else -1,
            GLU=glu,
            IEEE=a_MK.dtype == torch.float32,
            NUM_PROGS=progs,
            GROUP_M=8,
            BLOCK_M=BM,
            BLOCK_N=BN,
            BLOCK_K=BK,
            BLOCK_E=next_pow2(E),
            H_TMA=h_tma,
            num_warps=warps,
            num_stages=stages,
        )
    return h_MN, act_MI


def _h_by_tma(glu: bool, aligned: bool, K: int, gathered: bool) -> bool:
    """Whether a GLU's ``h`` goes out through a TMA descriptor (whole row tiles; partial ones masked),
    in an unflattened tile loop with 3 stages. H200, up + SwiGLU, against the masked stores in the
    flattened loop (docs/kernels.md): 0.94-0.97x at fine / OLMoE / Mixtral-like shapes (D >= 2048)
    and at seed (D 1024) without the row gather; with it at seed 1.07x (the unflattened loop costs the
    gathered loads more than the store saves): there the masked stores stay."""
    return glu and aligned and (not gathered or K >= 2048)


_WGRAD_GROUP_P = 8


def tma_grouped_wgrad(
    a_MP: torch.Tensor, b_MQ: torch.Tensor, offs_E: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``[E, P, Q]``: ``a_e.T @ b_e`` per row group (zeros for an empty group); with ``out`` (``[E, P,
    Q]``, unit last stride) added into it, in fp32 with one rounding, and ``out`` returned."""
    P, Q, E = a_MP.shape[1], b_MQ.shape[1], offs_E.shape[0]
    c_EPQ = a_MP.new_empty((E, P, Q)) if out is None else out
    if E and P and Q:
        _ensure_allocator()
        BP, BQ, BK, warps, stages = _tiles(a_MP.dtype, False)
        progs = min(_num_programs(a_MP.device), E * cdiv(P, BP) * cdiv(Q, BQ))
        _tma_wgrad_kernel[(progs,)](
            a_MP,
            b_MQ,
            c_EPQ,
            offs_E,
            P,
            Q,
            E,
            a_MP.stride(0),
            b_MQ.stride(0),
            c_EPQ.stride(0),
            c_EPQ.stride(1),
            ACCUMULATE=out is not None,
            IEEE=a_MP.dtype == torch.float32,
            NUM_PROGS=progs,
            GROUP_P=_WGRAD_GROUP_P,
            BLOCK_P=BP,
            BLOCK_Q=BQ,
            BLOCK_K=BK,
            num_warps=warps,
            num_stages=stages,
        )
    return c_EPQ
