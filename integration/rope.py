"""Rotary position embedding of an attention block's packed q/k/v projection: ``rope_qkv``.

``rope_qkv(qkv [B, S, 3, H, d], table) -> (q, k, v)``, each a new ``[B, S, H, d]`` tensor: q and k
rotated (pairs of halves of the last dim, angle position x frequency), v copied. New tensors, so that
what attention keeps for backward does not keep the projection's output alive. Backward rotates
q's and k's gradients back (the same kernel, angle negated) and writes all three gradients straight
into the projection's ``[B, S, 3, H, d]`` gradient. One pass each way, fp32 arithmetic from the stored
values, one rounding: what torch.compile's fused kernel computes from the same formula
(``rope_reference``), whose backward read the three gradients through a stack and ran at ~2.4x the
bandwidth floor (seed-1b, H200: 1.1 ms a step).

Triton kernels for CUDA tensors; ``rope_reference`` elsewhere (or on request).

Legend: B sequences, S positions, H heads, d head dim (even), C = d/2 frequencies.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from flashfusemoe.backends.triton.launch import cdiv, fast_launch, next_pow2
from flashfusemoe.backends.triton.ops import custom_op

__all__ = ["rope_qkv", "rope_reference", "rope_table"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_BLOCK_S = 4  # positions a program rotates (all heads): 4 x 16 heads x 64 = 4096 elements at seed-1b


def rope_table(S: int, d: int) -> torch.Tensor:
    """``[2, S, 1, d/2]``: cos and sin of the rotary angles, position x frequency (fp32)."""
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang_SC = torch.outer(torch.arange(S, dtype=torch.float32), inv)
    return torch.stack([ang_SC.cos(), ang_SC.sin()])[:, :, None, :]


def rope_reference(x_BSHd: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` in plain torch: ``[a, b] -> [a cos - b sin, a sin + b cos]`` over the
    halves ``a, b`` of the last dim, ``table`` from :func:`rope_table` (at least S positions)."""
    S, d = x_BSHd.shape[1], x_BSHd.shape[-1]
    cos, sin = table[0, :S], table[1, :S]
    a, b = x_BSHd[..., : d // 2], x_BSHd[..., d // 2 :]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


@fast_launch
@triton.jit
def _rope_kernel(
    src_ptr, dst_ptr, table_ptr, S, H, C, table_S,
    src_sb, src_ss, src_sh, dst_sb, dst_ss, dst_sh,
    ROTATE: tl.constexpr, SIGN: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``BLOCK_S`` positions of sequence ``program_id(1)``, every head: ``dst = rot(SIGN * angle) src``
    (a copy without ``ROTATE``); the last dim of both has unit stride."""
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)[:, None, None]
    h = tl.arange(0, BLOCK_H)[None, :, None]
    c = tl.arange(0, BLOCK_C)[None, None, :]
    b = tl.program_id(1).to(tl.int64)
    mask = (s < S) & (h < H) & (c < C)
    src = src_ptr + b * src_sb + s.to(tl.int64) * src_ss + h * src_sh + c
    dst = dst_ptr + b * dst_sb + s.to(tl.int64) * dst_ss + h * dst_sh + c
    x1 = tl.load(src, mask=mask).to(tl.float32)
    x2 = tl.load(src + C, mask=mask).to(tl.float32)
    if ROTATE:
        cos = tl.load(table_ptr + s * C + c, mask=(s < S) & (c < C)).to(tl.float32)
        sin = SIGN * tl.load(table_ptr + (table_S + s) * C + c, mask=(s < S) & (c < C)).to(tl.float32)
        x1, x2 = x1 * cos - x2 * sin, x1 * sin + x2 * cos
    tl.store(dst, x1.to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + C, x2.to(dst_ptr.dtype.element_ty), mask=mask)


def _launch(src_BSHd: torch.Tensor, dst_BSHd: torch.Tensor, table: torch.Tensor, rotate: bool, sign: int):
    B, S, H, d = src_BSHd.shape
    if not (B and S and H):
        return
    if src_BSHd.stride(-1) != 1:
        src_BSHd = src_BSHd.contiguous()
    C = d // 2
    _rope_kernel[(cdiv(S, _BLOCK_S), B)](
        src_BSHd, dst_BSHd, table, S, H, C, table.shape[1],
        src_BSHd.stride(0), src_BSHd.stride(1), src_BSHd.stride(2),
        dst_BSHd.stride(0), dst_BSHd.stride(1), dst_BSHd.stride(2),
        ROTATE=rotate, SIGN=sign, BLOCK_S=_BLOCK_S, BLOCK_H=next_pow2(H), BLOCK_C=next_pow2(C),
    )  # fmt: skip


def _fwd_fake(qkv_BS3Hd, table):
    B, S, _, H, d = qkv_BS3Hd.shape
    return tuple(qkv_BS3Hd.new_empty((B, S, H, d)) for _ in range(3))


@custom_op("lm_rope_qkv", _fwd_fake)
def _fwd(qkv_BS3Hd: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _fwd_fake(qkv_BS3Hd, table)
    for j, dst in enumerate((q, k, v)):
        _launch(qkv_BS3Hd[:, :, j], dst, table, rotate=j < 2, sign=1)
    return q, k, v


def _bwd_fake(dq_BSHd, dk_BSHd, dv_BSHd, table):
    B, S, H, d = dq_BSHd.shape
    return dq_BSHd.new_empty((B, S, 3, H, d))


@custom_op("lm_rope_qkv_bwd", _bwd_fake)
def _bwd(
    dq_BSHd: torch.Tensor, dk_BSHd: torch.Tensor, dv_BSHd: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    dqkv = _bwd_fake(dq_BSHd, dk_BSHd, dv_BSHd, table)
    for j, src in enumerate((dq_BSHd, dk_BSHd, dv_BSHd)):
        _launch(src, dqkv[:, :, j], table, rotate=j < 2, sign=-1)
    return dqkv


class _RopeQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv_BS3Hd, table):
        ctx.save_for_backward(table)
        return _fwd(qkv_BS3Hd, table)

    @staticmethod
    def backward(ctx, dq, dk, dv):  # an unused output's gradient comes as zeros (materialized)
        (table,) = ctx.saved_tensors
        return _bwd(dq, dk, dv, table), None


def rope_qkv(
    qkv_BS3Hd: torch.Tensor, table: torch.Tensor, kernel: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rope(q), rope(k), v)``, each a new contiguous ``[B, S, H, d]`` tensor in qkv's dtype, from the
    packed projection ``qkv [B, S, 3, H, d]`` (unit last stride) and ``table`` from :func:`rope_table`
    (``[2, >= S, 1, d/2]``, not differentiated); differentiable in ``qkv``. ``kernel``: the Triton
    kernels (default: for CUDA tensors; on the CPU they need ``TRITON_INTERPRET=1``), else
    ``rope_reference``."""
    B, S, three, H, d = qkv_BS3Hd.shape
    table_ok = table.dim() == 4 and table.shape[0] == 2 and table.shape[1] >= S and table.shape[-1] == d // 2
    if three != 3 or d % 2 or not table_ok:
        raise ValueError(
            f"rope_qkv: qkv must be [B, S, 3, H, d] with d even and table [2, >= S, 1, d/2]; got "
            f"{tuple(qkv_BS3Hd.shape)} and {tuple(table.shape)}"
        )
    if kernel is None:
        kernel = qkv_BS3Hd.is_cuda
    if kernel and not (qkv_BS3Hd.is_cuda or _INTERPRET):
        raise ValueError("rope_qkv: kernel=True on the CPU needs TRITON_INTERPRET=1 (Triton's interpreter)")
    if not kernel:
        q, k, v = qkv_BS3Hd.unbind(2)
        return rope_reference(q, table), rope_reference(k, table), v.clone()
    return _RopeQKV.apply(qkv_BS3Hd, table.contiguous())
