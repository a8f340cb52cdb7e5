"""Expert activation kernels (GLU and plain), forward and a backward fused with the routing weights.

Forward: ``a = act(h)`` with ``h = x @ w_up.T`` (GLU: gate columns first, then up).
Backward, per expert row r of weight ``w_r``: given ``g_a`` = the *unweighted* gradient of the
activation output (``grad_out[token] @ w_down``), it returns ``grad_h`` (weighted), ``w*a`` (the
operand of the ``w_down`` gradient) and ``grad_w = <g_a, a>``, the routing-weight gradient, written
straight to the row's slot, so the expert outputs ``y`` never need to be stored.

Legend: N rows in expert order (first ``live`` used), S = N slots (token-major, T*K), F = columns of h
(2I for GLU), I = columns of a.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashfusemoe.backends.triton.launch import cdiv, fast_launch, next_pow2
from flashfusemoe.spec import is_glu

__all__ = ["ACT_CODES", "activation_backward", "activation_forward"]

ACT_CODES = {"swiglu": 0, "geglu": 1, "relu": 2, "gelu": 3, "silu": 4, "relu2": 5}


@triton.jit
def _act_and_grad(x, ACT: tl.constexpr):
    """Elementwise activation f(x) and f'(x) in fp32 (SiLU for swiglu/silu, erf-GELU for geglu/gelu)."""
    if ACT == 0 or ACT == 4:
        s = tl.sigmoid(x)
        return x * s, s * (1.0 + x * (1.0 - s))
    elif ACT == 1 or ACT == 3:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        return x * cdf, cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif ACT == 2:
        return tl.maximum(x, 0.0), (x > 0).to(tl.float32)
    else:
        r = tl.maximum(x, 0.0)
        return r * r, 2.0 * r


@fast_launch
@triton.jit
def _act_fwd_kernel(
    h_ptr,
    a_ptr,
    live_ptr,
    N,
    I,
    h_stride,
    a_stride,
    ACT: tl.constexpr,
    GLU: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    row_ok = (rows < N) & (rows < tl.load(live_ptr))
    mask = row_ok[:, None] & (cols[None, :] < I)
    h_row = h_ptr + rows[:, None].to(tl.int64) * h_stride
    g = tl.load(h_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(g, ACT)
    if GLU:
        a = a * tl.load(h_row + I + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(
        a_ptr + rows[:, None].to(tl.int64) * a_stride + cols[None, :], a.to(a_ptr.dtype.element_ty), mask=mask
    )


def activation_forward(h_NF: torch.Tensor, activation: str, live: torch.Tensor) -> torch.Tensor:
    """``a [N, I]`` in h's dtype; rows at or past ``live`` are left unwritten."""
    glu = is_glu(activation)
    N, F = h_NF.shape
    I = F // 2 if glu else F
    a_NI = h_NF.new_empty((N, I))
    if N and I:
        BLOCK_I = min(next_pow2(I), 256)
        grid = (cdiv(N, 8), cdiv(I, BLOCK_I))
        _act_fwd_kernel[grid](
            h_NF,
            a_NI,
            live,
            N,
            I,
            h_NF.stride(0),
            a_NI.stride(0),
            ACT=ACT_CODES[activation],
            GLU=glu,
            BLOCK_R=8,
            BLOCK_I=BLOCK_I,
        )
    return a_NI


@fast_launch
@triton.jit
def _act_bwd_kernel(
    h_ptr,
    ga_ptr,
    w_ptr,
    row_slot_ptr,
    gh_ptr,
    wa_ptr,
    gw_ptr,
    live_ptr,
    N,
    I,
    h_stride,
    ga_stride,
    gh_stride,
    wa_stride,
    HAS_W: tl.constexpr,
    ACT: tl.constexpr,
    GLU: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = (rows < N) & (rows < tl.load(live_ptr))
    rows64 = rows[:, None].to(tl.int64)
    if HAS_W:  # the slot that owns each row, and its routing weight
        slots = tl.load(row_slot_ptr + rows, mask=row_ok, other=0)
        w = tl.load(w_ptr + slots, mask=row_ok, other=0.0)[:, None]
    else:
        slots = rows
        w = tl.full((BLOCK_R, 1), 1.0, tl.float32)
    gw = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for i0 in range(0, I, BLOCK_I):  # whole rows per program: the <g_a, a> sum needs no atomics
        cols = i0 + tl.arange(0, BLOCK_I)
        mask = row_ok[:, None] & (cols[None, :] < I)
        g = tl.load(h_ptr + rows64 * h_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        ga = tl.load(ga_ptr + rows64 * ga_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        f, df = _act_and_grad(g, ACT)
        if GLU:
            u = tl.load(h_ptr + rows64 * h_stride + I + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            a = f * u
            tl.store(
                gh_ptr + rows64 * gh_stride + cols[None, :],
                (w * ga * u * df).to(gh_ptr.dtype.element_ty),
                mask=mask,
            )
            tl.store(
                gh_ptr + rows64 * gh_stride + I + cols[None, :],
                (w * ga * f).to(gh_ptr.dtype.element_ty),
                mask=mask,
            )
        else:
            a = f
            tl.store(
                gh_ptr + rows64 * gh_stride + cols[None, :],
                (w * ga * df).to(gh_ptr.dtype.element_ty),
                mask=mask,
            )
        tl.store(wa_ptr + rows64 * wa_stride + cols[None, :], (w * a).to(wa_ptr.dtype.element_ty), mask=mask)
        gw += tl.sum(ga * a, axis=1)
    tl.store(gw_ptr + slots, gw, mask=row_ok)


def activation_backward(
    h_NF: torch.Tensor,
    grad_a_NI: torch.Tensor,
    activation: str,
    live: torch.Tensor,
    weights_S: torch.Tensor | None = None,
    row_slot_N: torch.Tensor | None = None,
    overwrite_h: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``grad_h [N, F]`` (times w), ``w*a [N, I]`` (h's dtype) and ``grad_w_S [N]`` (fp32, slot
    order; 0 for slots with no row), where row r's slot is ``row_slot_N[r]`` and its weight
    ``weights_S[row_slot_N[r]]`` (fp32 slot weights); without weights, slot = row and weight = 1.

    ``w*a`` is written over ``grad_a_NI`` and, with ``overwrite_h`` (for an ``h`` the caller owns, e.g.
    recomputed), ``grad_h`` over ``h_NF``: a program reads a tile, then overwrites that same tile, so
    each consumed input saves its buffer at the backward's peak."""
    glu = is_glu(activation)
    N, F = h_NF.shape
    I = grad_a_NI.shape[1]
    grad_h_NF = h_NF if overwrite_h else torch.empty_like(h_NF)
    wa_NI = grad_a_NI
    S = weights_S.shape[0] if weights_S is not None else N
    grad_w_S = torch.zeros(S, dtype=torch.float32, device=h_NF.device)
    if N and I:
        # H200 sweep (bf16, SwiGLU; 8 x 128 x 4 warps before): wide rows want few rows of long column
        # blocks, 2 x 1024 x 8 (I 2048: 3-6% faster, 3.8 TB/s; 14336: 4%); I 768-1024: 4 x 256 x 4 (2%)
        BLOCK_R, BLOCK_I, warps = (2, 1024, 8) if I >= 2048 else (4, 256, 4)
        BLOCK_I = min(next_pow2(I), BLOCK_I)
        _act_bwd_kernel[(cdiv(N, BLOCK_R),)](
            h_NF,
            grad_a_NI,
            weights_S if weights_S is not None else grad_w_S,
            row_slot_N if row_slot_N is not None else live,
            grad_h_NF,
            wa_NI,
            grad_w_S,
            live,
            N,
            I,
            h_NF.stride(0),
            grad_a_NI.stride(0),
            grad_h_NF.stride(0),
            wa_NI.stride(0),
            HAS_W=weights_S is not None,
            ACT=ACT_CODES[activation],
            GLU=glu,
            BLOCK_R=BLOCK_R,
            BLOCK_I=BLOCK_I,
            num_warps=warps,
        )
    return grad_h_NF, wa_NI, grad_w_S
