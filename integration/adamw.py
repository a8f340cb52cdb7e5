"""AdamW whose update is one Triton kernel launch per parameter tensor (``AdamW``), for the LM example.

torch's ``fused=True`` AdamW moves its bytes at 2.8 TB/s on an H200 (seed-1b: 1.16B bf16 parameters in
165 tensors, 5.8 ms of kernels a step); this kernel at 3.7 TB/s (4.3 ms; a device-to-device copy of
as many bytes runs at 4.3 TB/s). It is torch's optimizer with another ``step``: the same
hyperparameters, the same state (``exp_avg``, ``exp_avg_sq`` in the parameter's dtype, ``step`` a CPU
tensor), the same state dict, and fp32 arithmetic per element from the stored values, each result
rounded once (as torch's fused kernel):

    p *= 1 - lr * wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

The coefficients come from the host (each tensor has its own step count and group), so the step never
waits for the GPU. One launch per tensor: a single launch over all of them through tables of addresses
measured 2.1 TB/s (dependent loads before each block's data).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from flashfusemoe.backends.triton.launch import cdiv, fast_launch

__all__ = ["AdamW"]

_BLOCK = 4096  # elements a program updates (H200, seed-1b: 8192 12% slower)
_UNSUPPORTED = ("amsgrad", "maximize", "capturable", "differentiable", "fused")
# Read once, as Triton reads it when the kernel is defined (and a per-parameter environment lookup
# would cost the step ~0.3 ms of host time over seed-1b's 165 tensors)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@fast_launch
@triton.jit
def _adamw_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, n, decay, step_size, bc2_sqrt, eps, b1, c1, b2, c2, BLOCK: tl.constexpr
):
    """BLOCK elements of one tensor; the coefficients as in ``_coefficients``."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
    p = p * decay
    m = b1 * m + c1 * g
    v = b2 * v + c2 * g * g
    p = p - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)


def _coefficients(group: dict, t: float) -> tuple[float, ...]:
    """1 - lr wd, lr / (1 - b1^t), sqrt(1 - b2^t), eps, b1, 1 - b1, b2, 1 - b2 at step t: in double on the
    host (1 - b2 from an fp32 b2 would be off by 1e-5 relative)."""
    lr, (b1, b2) = group["lr"], group["betas"]
    bias = (lr / (1 - b1**t), math.sqrt(1 - b2**t))
    return (1 - lr * group["weight_decay"], *bias, group["eps"], b1, 1 - b1, b2, 1 - b2)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` (float ``lr``, no amsgrad / maximize / capturable / differentiable / fused:
    a clear error) whose ``step`` runs one Triton kernel per parameter tensor. Parameters must be dense
    fp32, bf16 or fp16 tensors on a GPU (on the CPU only under ``TRITON_INTERPRET=1``)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        **kw,
    ):
        for name in _UNSUPPORTED:
            if kw.get(name):
                raise ValueError(
                    f"AdamW: {name}=True is not supported by the Triton step; use torch.optim.AdamW"
                )
        if isinstance(lr, torch.Tensor):
            raise ValueError("AdamW: lr must be a float (a tensor lr is not supported by the Triton step)")
        kw.pop("foreach", None)  # torch's choice of its own implementation: ours replaces both
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False, **kw)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = []  # everything is checked before anything is updated
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    state = self.state[p]
                    if not state:
                        state["step"] = torch.tensor(0.0)
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    _check(p, state)
                    todo.append((p, state, group))
        for p, state, group in todo:
            if not state["step"].is_cpu:  # e.g. loaded from a fused/capturable AdamW's state
                state["step"] = state["step"].cpu()
            state["step"] += 1
            n = p.numel()
            if n:
                _adamw_kernel[(cdiv(n, _BLOCK),)](
                    p, p.grad, state["exp_avg"], state["exp_avg_sq"], n,
                    *_coefficients(group, state["step"].item()), BLOCK=_BLOCK, num_warps=8,
                )  # fmt: skip
        return loss


def _check(p: torch.Tensor, state: dict) -> None:
    """Refuse what the kernel cannot update (it reads the four tensors as flat arrays of p's dtype),
    naming the parameter's shape."""
    g = p.grad
    if p.dtype not in _DTYPES:
        raise ValueError(
            f"AdamW: a parameter of shape {tuple(p.shape)} is {p.dtype}; "
            f"the Triton step takes fp32, bf16 or fp16"
        )
    if g.is_sparse or g.dtype != p.dtype or g.device != p.device:
        raise ValueError(
            f"AdamW: the gradient of the parameter of shape {tuple(p.shape)} must be dense, {p.dtype}, "
            f"on {p.device}; got {'sparse ' if g.is_sparse else ''}{g.dtype} on {g.device}"
        )
    if not (p.is_contiguous() and g.is_contiguous()):
        raise ValueError(
            f"AdamW: the parameter of shape {tuple(p.shape)} and its gradient must be contiguous"
        )
    for key in ("exp_avg", "exp_avg_sq"):
        s = state[key]
        if s.shape != p.shape or s.dtype != p.dtype or s.device != p.device or not s.is_contiguous():
            raise ValueError(
                f"AdamW: state {key!r} of the parameter of shape {tuple(p.shape)} must be a contiguous "
                f"{p.dtype} tensor of that shape on {p.device}; got {s.dtype} {tuple(s.shape)} on {s.device}"
            )
    if not (p.is_cuda or _INTERPRET):
        raise ValueError(
            f"AdamW: the parameter of shape {tuple(p.shape)} is on {p.device}; the Triton step needs a GPU"
        )
