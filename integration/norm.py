"""A residual add and an RMSNorm, with a fused Triton backward: ``add_rms_norm``.

``add_rms_norm(x, r, weight, eps) -> (h, y)``: ``h = x + r`` (``x`` itself without ``r``) and
``y = h * rsqrt(mean(h^2) + eps) * weight`` (fp32 arithmetic, one rounding), as a pre-norm block's
``x = x + sublayer(...); y = norm(x)``. The forward is plain torch (torch.compile fuses it and may
recompute it in backward instead of keeping ``y``). The backward is one pass: it reads h's gradient
from the residual path, y's gradient, ``h`` and the per-row ``rstd``, and writes the gradient of
``x`` (= r's), adding the two paths in the same pass. The weight gradient accumulates in fp32
per program, then a second kernel sums those partials in a fixed order (deterministic).

This is what torch.compile generated for ``nn.RMSNorm`` after a residual add. There the backward ran at
~2x its bandwidth floor, and an eager ``sum`` of ``[512, D]`` partials followed (seed-1b, H200: 1.7 ms
a step in the blocks' 36 norms).

On a GPU (or the CPU under ``TRITON_INTERPRET=1``) the Triton backward; elsewhere autograd through the
same formula.

Legend: T rows (tokens), D normalized dim, P programs of the backward.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from flashfusemoe.backends.triton.launch import cdiv, fast_launch, next_pow2
from flashfusemoe.backends.triton.ops import custom_op

__all__ = ["add_rms_norm"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_PROGRAMS = 264  # backward programs (2 per H200 SM): each walks rows, so P partial rows of dw
_BLOCK_T = 4  # rows per step of a program (a [4, D] tile: D = 1024 at seed-1b)


@fast_launch
@triton.jit
def _norm_bwd_kernel(
    dy_ptr, h_ptr, rstd_ptr, w_ptr, dh_ptr, dx_ptr, dw_part_ptr, T, D,
    HAS_DH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Rows ``pid*BLOCK_T, +P*BLOCK_T, ...`` (all D columns): ``dx = rstd (g - hn mean(g hn)) [+ dh]``
    with ``hn = h rstd``, ``g = dy w``; ``sum dy hn`` over those rows into ``dw_part[pid]``."""
    pid, P = tl.program_id(0), tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for t0 in range(pid * BLOCK_T, T, P * BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)[:, None]
        hn = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32) * rstd
        g = dy * w[None, :]
        dx = rstd * (g - hn * (tl.sum(g * hn, axis=1)[:, None] / D))
        if HAS_DH:
            dx += tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * hn, axis=0)
    tl.store(dw_part_ptr + pid * D + cols, dw, mask=col_ok)


@fast_launch
@triton.jit
def _sum_rows_kernel(part_ptr, out_ptr, P, D, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """``out[d] = sum_p part[p, d]`` (fp32, in p order), rounded to out's dtype."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p[:, None] < P) & (cols[None, :] < D)
        acc += tl.sum(tl.load(part_ptr + p[:, None] * D + cols[None, :], mask=mask, other=0.0), axis=0)
    tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < D)


def _bwd_fake(dy_TD, h_TD, rstd_T, w_D, dh_TD):
    return torch.empty_like(h_TD), torch.empty_like(w_D)


@custom_op("lm_rms_norm_bwd", _bwd_fake)
def _bwd(
    dy_TD: torch.Tensor,
    h_TD: torch.Tensor,
    rstd_T: torch.Tensor,
    w_D: torch.Tensor,
    dh_TD: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx [T, D] in h's dtype, dw [D] in w's dtype)``; ``dh`` (the residual path's gradient of h)
    added into dx when given."""
    T, D = h_TD.shape
    dx_TD, dw_D = _bwd_fake(dy_TD, h_TD, rstd_T, w_D, dh_TD)
    P = max(1, min(_PROGRAMS, cdiv(T, _BLOCK_T)))
    part_PD = torch.empty((P, D), dtype=torch.float32, device=h_TD.device)
    if D:
        _norm_bwd_kernel[(P,)](
            dy_TD.contiguous(), h_TD, rstd_T, w_D, dh_TD.contiguous() if dh_TD is not None else dy_TD,
            dx_TD, part_PD, T, D, HAS_DH=dh_TD is not None, BLOCK_T=_BLOCK_T, BLOCK_D=next_pow2(D),
        )  # fmt: skip
        _sum_rows_kernel[(cdiv(D, 256),)](part_PD, dw_D, P, D, BLOCK_P=16, BLOCK_D=256)
    return dx_TD, dw_D


def _forward(x_TD, r_TD, w_D, eps):
    """``(h, rstd [T] fp32, y)``: the formula, in torch ops."""
    h_TD = x_TD + r_TD if r_TD is not None else x_TD
    rstd_T = torch.rsqrt(h_TD.float().pow(2).mean(-1) + eps)
    return h_TD, rstd_T, (h_TD.float() * rstd_T[:, None] * w_D.float()).to(h_TD.dtype)


class _AddRMSNorm(torch.autograd.Function):
    """``(h, y)`` with ``r``; ``y`` alone without it (h is then x itself, whose other uses autograd
    sums with this function's gradient)."""

    @staticmethod
    def forward(ctx, x_TD, r_TD, w_D, eps):
        h_TD, rstd_T, y_TD = _forward(x_TD, r_TD, w_D, eps)
        ctx.save_for_backward(h_TD.contiguous(), rstd_T, w_D)  # the kernel reads rows D apart
        ctx.has_r = r_TD is not None
        return (h_TD, y_TD) if ctx.has_r else y_TD

    @staticmethod
    def backward(ctx, *grads):
        h_TD, rstd_T, w_D = ctx.saved_tensors
        dh_TD, dy_TD = grads if ctx.has_r else (None, grads[0])
        dx_TD, dw_D = _bwd(dy_TD, h_TD, rstd_T, w_D, dh_TD)
        return dx_TD, (dx_TD if ctx.has_r else None), dw_D, None


def add_rms_norm(
    x: torch.Tensor,
    r: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float | None = None,
    kernel: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, y)``: ``h = x + r`` (``x`` without ``r``), ``y = h * rsqrt(mean(h^2, -1) + eps) * weight``
    in fp32, rounded once to h's dtype. ``x`` and ``r``: ``[..., D]`` of one shape and dtype;
    ``weight``: ``[D]``; ``eps`` default ``torch.finfo(x.dtype).eps`` (as ``nn.RMSNorm``'s). ``kernel``:
    the Triton backward (default: for CUDA tensors, and on the CPU under ``TRITON_INTERPRET=1``), else
    autograd through the same formula."""
    D = x.shape[-1]
    if weight.shape != (D,) or (r is not None and (r.shape != x.shape or r.dtype != x.dtype)):
        raise ValueError(
            f"add_rms_norm: x [..., D] and r of its shape and dtype, weight [D]; got x {x.dtype} "
            f"{tuple(x.shape)}, r {None if r is None else (r.dtype, tuple(r.shape))}, "
            f"weight {tuple(weight.shape)}"
        )
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    if kernel is None:
        kernel = x.is_cuda or _INTERPRET
    if kernel and not (x.is_cuda or _INTERPRET):
        raise ValueError(
            "add_rms_norm: kernel=True on the CPU needs TRITON_INTERPRET=1 (Triton's interpreter)"
        )
    x_TD, r_TD = x.reshape(-1, D), r.reshape(-1, D) if r is not None else None
    if not kernel:
        h_TD, _, y_TD = _forward(x_TD, r_TD, weight, eps)
    elif r is None:
        h_TD, y_TD = x_TD, _AddRMSNorm.apply(x_TD, None, weight, eps)
    else:
        h_TD, y_TD = _AddRMSNorm.apply(x_TD, r_TD, weight, eps)
    return h_TD.view(x.shape), y_TD.view(x.shape)
