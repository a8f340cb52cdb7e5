"""Grouped GEMMs over row groups (expert-sorted rows), with no host sync and no padding.

Three forms behind one entry each, over three implementations (``path``):
- ``grouped_mm(a [M, K], b [E, K, N], offs)``: rows ``[offs[e-1], offs[e])`` of ``a`` times ``b[e]``.
- ``grouped_mm_act(...)``: the same plus the expert activation of the result (fused into the TMA
  kernel's epilogue; a separate kernel on the other paths).
- ``grouped_mm_wgrad(a [M, P], b [M, Q], offs)``: ``out[e] = a_e.T @ b_e`` over the same row groups
  (the weight gradient), ``[E, P, Q]``; an expert with no rows gets zeros; or added into ``out``.
The first two take their token rows either as given or through the slot index (``gather``): read in
place by the TMA kernel, gathered first on the other paths.
Paths: ``"tma"`` (``tma_gemm.py``: persistent TMA kernels, Hopper, aligned strides), ``"torch"``
(``torch._grouped_mm``: CUTLASS, bf16, aligned strides) and ``"triton"`` (the pointer-load kernels
below: any GPU, fp32, odd strides, the CPU interpreter). The default follows the H100 measurements in
docs/kernels.md: a GEMM over gathered rows (with or without the activation) on TMA up to a width
(``_fuse_rows``); plain GEMMs on CUTLASS where it runs (the TMA kernel ties it on the large shapes,
within the power-capped clock's noise, and loses by 4-13% on the small ones), else on TMA (fp16:
1.4-3x faster than the pointer kernels), else pointer loads.

Legend: M rows (expert-sorted), E experts (groups), K/P/Q/N matrix dims, offs int32 inclusive row ends.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashfusemoe.backends.triton.activation import activation_forward
from flashfusemoe.backends.triton.launch import cdiv, fast_launch, next_pow2
from flashfusemoe.backends.triton.permute import gather_rows
from flashfusemoe.backends.triton.tma_gemm import glu_halves_ok, tma_grouped_mm, tma_grouped_wgrad, tma_ok

__all__ = ["grouped_mm", "grouped_mm_act", "grouped_mm_wgrad"]


@triton.jit
def _find_tile(pid_m, offs_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Map a row-tile index to (expert, first row, group end), all experts at once: each expert's
    tiles, their running sum, and the one expert whose tile range holds ``pid_m`` (-1 past the end)."""
    es = tl.arange(0, BLOCK_E)
    ends = tl.load(offs_ptr + es, mask=es < E, other=0)
    starts = tl.load(offs_ptr + es - 1, mask=(es > 0) & (es < E), other=0)
    n_tiles = tl.where(es < E, tl.cdiv(ends - starts, BLOCK_M), 0)
    tiles_end = tl.cumsum(n_tiles, axis=0)
    hit = (pid_m >= tiles_end - n_tiles) & (pid_m < tiles_end)
    expert = tl.max(tl.where(hit, es, -1), axis=0)
    row0 = tl.sum(tl.where(hit, starts + (pid_m - (tiles_end - n_tiles)) * BLOCK_M, 0), axis=0)
    row_end = tl.sum(tl.where(hit, ends, 0), axis=0)
    return expert, row0, row_end


@fast_launch
@triton.jit
def _grouped_mm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    offs_ptr,
    N,
    K,
    E,
    s_am,
    s_ak,
    s_be,
    s_bk,
    s_bn,
    s_cm,
    s_cn,
    IEEE: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    expert, row0, row_end = _find_tile(tl.program_id(0), offs_ptr, E, BLOCK_M, BLOCK_E)
    if expert >= 0:
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_ok = rows < row_end
        col_ok = cols < N
        a_tile = a_ptr + rows[:, None].to(tl.int64) * s_am + ks[None, :] * s_ak
        b_tile = b_ptr + expert.to(tl.int64) * s_be + ks[:, None] * s_bk + cols[None, :] * s_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_tile, mask=row_ok[:, None], other=0.0)
                b = tl.load(b_tile, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = (k0 + ks) < K
                a = tl.load(a_tile, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_tile, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            a_tile += BLOCK_K * s_ak
            b_tile += BLOCK_K * s_bk
        c = c_ptr + rows[:, None].to(tl.int64) * s_cm + cols[None, :] * s_cn
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@fast_launch
@triton.jit
def _grouped_wgrad_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    offs_ptr,
    P,
    Q,
    s_am,
    s_ap,
    s_bm,
    s_bq,
    s_ce,
    s_cp,
    s_cq,
    ACCUMULATE: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    expert = tl.program_id(0)
    n_q = tl.cdiv(Q, BLOCK_Q)
    ps = (tl.program_id(1) // n_q) * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = (tl.program_id(1) % n_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    start = tl.load(offs_ptr + expert - 1, mask=expert > 0, other=0)
    end = tl.load(offs_ptr + expert)
    ks = tl.arange(0, BLOCK_K)
    p_ok = ps < P
    q_ok = qs < Q
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_K):
        m_ok = (m0 + ks) < end
        rows = (m0 + ks).to(tl.int64)
        a = tl.load(
            a_ptr + rows[None, :] * s_am + ps[:, None] * s_ap, mask=m_ok[None, :] & p_ok[:, None], other=0.0
        )
        b = tl.load(
            b_ptr + rows[:, None] * s_bm + qs[None, :] * s_bq, mask=m_ok[:, None] & q_ok[None, :], other=0.0
        )
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    c = c_ptr + expert.to(tl.int64) * s_ce + ps[:, None] * s_cp + qs[None, :] * s_cq
    if ACCUMULATE:  # into a gradient buffer: one rounding
        acc += tl.load(c, mask=p_ok[:, None] & q_ok[None, :], other=0.0).to(tl.float32)
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])


def _torch_grouped_mm_ok(*tensors: torch.Tensor) -> bool:
    """torch._grouped_mm needs CUDA bf16 operands whose non-unit strides are multiples of 16 bytes."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    for t in tensors:
        if not t.is_cuda or t.dtype != torch.bfloat16 or t.numel() == 0:
            return False
        if any(s != 1 and (s * t.element_size()) % 16 for s in t.stride()):
            return False
        if t.data_ptr() % 16:
            return False
    return True


def _blocks(dim: int, cap: int) -> int:
    return max(16, min(cap, next_pow2(dim)))


def _tiles(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(rows, cols, depth, warps, stages) of a tile: large tensor-core tiles for 16-bit operands; small
    ones for fp32, whose exact (IEEE) dot runs on the FMA units and needs 4-byte shared memory."""
    if dtype == torch.float32:
        return 64, 64, 32, 4, 2
    return 128, 128, 64, 8, 3


def _path(a: torch.Tensor, b: torch.Tensor) -> str:
    if _torch_grouped_mm_ok(a, b):
        return "torch"
    return "tma" if tma_ok(a, b) else "triton"


# The TMA kernel reads token rows through the slot index and (with an activation) activates in its
# epilogue: it saves the permuted copy and the activation pass, traffic that shrinks next to the GEMM
# as the output gets wider, while the kernel's own overhead does not. H100 (docs/kernels.md), fused vs
# gather + CUTLASS + activation kernel: ahead up to N = 2I = 5120 (fine-grained, Qwen2-, DeepSeek-like
# shapes, by up to 0.35 ms), even at seed-/OLMoE-like ones, behind from N = 14336 (Mixtral-like, 0.2-0.4 ms).
_FUSE_MAX_N = 8192


def _fuse_rows(a_MK: torch.Tensor, b_EKN: torch.Tensor) -> bool:
    """Whether a GEMM over gathered rows should read them in place (TMA) rather than permute them."""
    return tma_ok(a_MK, b_EKN) and b_EKN.shape[2] <= _FUSE_MAX_N


def _gathered(a: torch.Tensor, gather: tuple[torch.Tensor, int] | None, offs_E: torch.Tensor) -> torch.Tensor:
    return a if gather is None else gather_rows(a, gather[0], offs_E[-1:], gather[1])


def grouped_mm(
    a_MK: torch.Tensor,
    b_EKN: torch.Tensor,
    offs_E: torch.Tensor,
    path: str | None = None,
    gather: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """``[M, N]``: row group e of ``a`` times ``b[e]``; rows past ``offs[-1]`` are left unwritten. With
    ``gather = (idx_M, div)`` row r is row ``idx[r] // div`` of ``a``: read in place on the TMA path
    (the default for a gather where TMA runs and N is at most ``_FUSE_MAX_N``), permuted first on the
    others."""
    if gather is not None and path is None and _fuse_rows(a_MK, b_EKN):
        path = "tma"
    if path == "tma":
        return tma_grouped_mm(a_MK, b_EKN, offs_E, gather=gather)[0]
    a_MK = _gathered(a_MK, gather, offs_E)
    M, K = a_MK.shape
    E, _, N = b_EKN.shape
    path = path or _path(a_MK, b_EKN)
    if path == "torch":
        return torch._grouped_mm(a_MK, b_EKN, offs=offs_E)
    c_MN = a_MK.new_empty((M, N))
    if M and N:
        BM, cap_n, cap_k, warps, stages = _tiles(a_MK.dtype)
        BN, BK = _blocks(N, cap_n), _blocks(K, cap_k)
        grid = (cdiv(M, BM) + E, cdiv(N, BN))  # at most one partial tile per group beyond M / BM
        _grouped_mm_kernel[grid](
            a_MK,
            b_EKN,
            c_MN,
            offs_E,
            N,
            K,
            E,
            *a_MK.stride(),
            *b_EKN.stride(),
            *c_MN.stride(),
            IEEE=a_MK.dtype == torch.float32,
            EVEN_K=K % BK == 0,
            BLOCK_M=BM,
            BLOCK_N=BN,
            BLOCK_K=BK,
            BLOCK_E=next_pow2(E),
            num_warps=warps,
            num_stages=stages,
        )
    return c_MN


def grouped_mm_act(
    a_MK: torch.Tensor,
    b_EKN: torch.Tensor,
    offs_E: torch.Tensor,
    activation: str,
    path: str | None = None,
    gather: tuple[torch.Tensor, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h [M, N], act(h) [M, I])`` (I = N/2 for GLU activations); rows past ``offs[-1]`` unwritten.
    With ``gather = (idx_M, div)`` the GEMM's row r is row ``idx[r] // div`` of ``a`` (``gather_rows``):
    read in place by the TMA kernel (by default where TMA runs and N <= ``_FUSE_MAX_N``), permuted
    first on the other paths. Unfused, ``h`` comes from ``grouped_mm`` on the same arguments: the
    path a recompute of ``h`` takes, so it is bit-identical."""
    if path is None and _fuse_rows(a_MK, b_EKN) and glu_halves_ok(b_EKN, activation):
        path = "tma"
    if path == "tma":
        return tma_grouped_mm(a_MK, b_EKN, offs_E, activation, gather)
    h_MN = grouped_mm(a_MK, b_EKN, offs_E, path, gather)
    return h_MN, activation_forward(h_MN, activation, offs_E[-1:])


def grouped_mm_wgrad(
    a_MP: torch.Tensor,
    b_MQ: torch.Tensor,
    offs_E: torch.Tensor,
    path: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[E, P, Q]``: ``a_e.T @ b_e`` per row group (zeros for an empty group). With ``out`` (``[E, P,
    Q]``, a's dtype, unit last stride) the product is added into ``out``, which is returned: in the
    Triton kernels' epilogues (fp32, one rounding, no temporary), so ``out`` picks TMA over CUTLASS."""
    P, Q, E = a_MP.shape[1], b_MQ.shape[1], offs_E.shape[0]
    if out is not None and path is None and tma_ok(a_MP, b_MQ, out):
        path = "tma"
    path = path or _path(a_MP, b_MQ)
    if path == "torch":
        c_EPQ = torch._grouped_mm(a_MP.t(), b_MQ, offs=offs_E)
        return c_EPQ if out is None else out.add_(c_EPQ)
    if path == "tma":
        return tma_grouped_wgrad(a_MP, b_MQ, offs_E, out)
    c_EPQ = a_MP.new_empty((E, P, Q)) if out is None else out
    if E and P and Q:
        cap_p, cap_q, BK, warps, stages = _tiles(a_MP.dtype)
        BP, BQ = _blocks(P, cap_p), _blocks(Q, cap_q)
        grid = (E, cdiv(P, BP) * cdiv(Q, BQ))
        _grouped_wgrad_kernel[grid](
            a_MP,
            b_MQ,
            c_EPQ,
            offs_E,
            P,
            Q,
            *a_MP.stride(),
            *b_MQ.stride(),
            *c_EPQ.stride(),
            ACCUMULATE=out is not None,
            IEEE=a_MP.dtype == torch.float32,
            BLOCK_P=BP,
            BLOCK_Q=BQ,
            BLOCK_K=BK,
            num_warps=warps,
            num_stages=stages,
        )
    return c_EPQ
