"""AdamW whose update is one Triton kernel over every parameter of a dtype (``AdamW``), for the LM example.

torch's ``fused=True`` AdamW moves its bytes at 2.8 TB/s on an H200 (seed-1b: 1.16B bf16 parameters,
5.9 ms of kernels a step); this kernel at 3.7-3.9 TB/s (4.2-4.3 ms; a device copy of the same bytes
reaches 4.3). It is torch's optimizer with another ``step``: the same hyperparameters, the same state
(``exp_avg``, ``exp_avg_sq`` in the parameter's dtype, ``step`` a CPU tensor), the same state dict, and the
same fp32 arithmetic as torch's fused kernel per element:

    p *= 1 - lr * wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Each program updates BLOCK elements of one tensor: which tensor, where its four operands live and its
coefficients (per tensor: each has its own step count and group) come from small tables built on the
host, so the step launches one kernel per parameter dtype and never waits for the GPU.

Legend: P parameter tensors of one dtype, B blocks of BLOCK elements over all of them, C coefficients.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from flashfusemoe.backends.triton.launch import cdiv

__all__ = ["AdamW"]

_BLOCK = 4096  # elements a program updates (H200, seed-1b: 2048 and 4096 within 1%, 8192 12% slower)
# coefficients per tensor: 1 - lr wd, lr / (1 - b1^t), sqrt(1 - b2^t), eps, b1, 1 - b1, b2, 1 - b2; each
# computed in double on the host (1 - b2 from an fp32 b2 would be off by 1e-5 relative)
_C = 8
_UNSUPPORTED = ("amsgrad", "maximize", "capturable", "differentiable", "fused")


@triton.jit
def _update(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, coef, DTYPE: tl.constexpr):
    """One block's update; ``mask`` None for a whole block (unmasked loads vectorize)."""
    decay, step_size, bc2_sqrt = tl.load(coef), tl.load(coef + 1), tl.load(coef + 2)
    eps, b1, c1 = tl.load(coef + 3), tl.load(coef + 4), tl.load(coef + 5)
    b2, c2 = tl.load(coef + 6), tl.load(coef + 7)
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
    p = p * decay
    m = b1 * m + c1 * g
    v = b2 * v + c2 * g * g
    p = p - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
    tl.store(p_ptr + offs, p.to(DTYPE), mask=mask)
    tl.store(m_ptr + offs, m.to(DTYPE), mask=mask)
    tl.store(v_ptr + offs, v.to(DTYPE), mask=mask)


@triton.jit
def _address(ptr_P4, t, i, DTYPE: tl.constexpr):
    """Operand i of tensor t as a pointer, 16-byte aligned (PyTorch's allocations are; the hint lets
    the loads vectorize, an address read from memory is otherwise assumed unaligned)."""
    return tl.multiple_of(tl.load(ptr_P4 + 4 * t + i), 16).to(tl.pointer_type(DTYPE))


@triton.jit
def _adamw_kernel(
    ptr_P4,  # int64 [P, 4]: addresses of param, grad, exp_avg, exp_avg_sq
    numel_P,
    coef_PC,  # fp32 [P, C]: see _C
    tensor_B,  # int32 [B]: the tensor a block belongs to
    block_B,  # int32 [B]: the block's index within its tensor
    DTYPE: tl.constexpr,
    C: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    t = tl.load(tensor_B + b).to(tl.int64)
    start = tl.load(block_B + b).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    n = tl.load(numel_P + t)
    p_ptr, g_ptr = _address(ptr_P4, t, 0, DTYPE), _address(ptr_P4, t, 1, DTYPE)
    m_ptr, v_ptr = _address(ptr_P4, t, 2, DTYPE), _address(ptr_P4, t, 3, DTYPE)
    if start + BLOCK <= n:
        _update(p_ptr, g_ptr, m_ptr, v_ptr, offs, None, coef_PC + C * t, DTYPE)
    else:  # a tensor's last block
        _update(p_ptr, g_ptr, m_ptr, v_ptr, offs, offs < n, coef_PC + C * t, DTYPE)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` (float ``lr``, no amsgrad / maximize / capturable / differentiable / fused:
    a clear error) whose ``step`` runs one Triton kernel per parameter dtype. Parameters must be dense
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
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False, **kw)
        self._tables: dict = {}  # (dtype, device) -> (addresses and sizes, the block tables they give)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        by_kind: dict[tuple, list] = {}  # (dtype, device) -> (param, state, group) of each to update
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                _check(p, state)
                if state["step"].device.type != "cpu":  # e.g. loaded from a fused/capturable AdamW's state
                    state["step"] = state["step"].cpu()
                state["step"] += 1
                by_kind.setdefault((p.dtype, p.device), []).append((p, state, group))
        for kind, items in by_kind.items():
            self._launch(kind, items)
        return loss

    def _launch(self, kind: tuple, items: list) -> None:
        dtype, device = kind
        static = tuple(
            (p.data_ptr(), s["exp_avg"].data_ptr(), s["exp_avg_sq"].data_ptr(), p.numel())
            for p, s, _ in items
        )
        cached = self._tables.get(kind)
        if cached is None or cached[0] != static:
            numel_P = [n for *_, n in static]
            blocks_P = [cdiv(n, _BLOCK) for n in numel_P]
            tensor_B = torch.repeat_interleave(
                torch.arange(len(items), dtype=torch.int32), torch.tensor(blocks_P)
            )
            first_P = torch.tensor([0, *blocks_P[:-1]]).cumsum(0)
            block_B = (torch.arange(tensor_B.numel()) - first_P[tensor_B.long()]).int()
            numel_P = torch.tensor(numel_P, dtype=torch.int64)
            cached = (static, *(t.to(device) for t in (tensor_B, block_B, numel_P)))
            self._tables[kind] = cached
        _, tensor_B, block_B, numel_P = cached
        if tensor_B.numel() == 0:  # only empty parameters
            return
        ptr_P4, coef_PC = [], []
        for (p, s, group), (p_at, m_at, v_at, _) in zip(items, static, strict=True):
            t = s["step"].item()  # a CPU tensor: no device sync
            b1, b2 = group["betas"]
            lr = group["lr"]
            ptr_P4.append((p_at, p.grad.data_ptr(), m_at, v_at))
            coef_PC.append(
                (1 - lr * group["weight_decay"], lr / (1 - b1**t), math.sqrt(1 - b2**t), group["eps"])
                + (b1, 1 - b1, b2, 1 - b2)
            )
        ptr_P4 = torch.tensor(ptr_P4, dtype=torch.int64).to(device, non_blocking=True)
        coef_PC = torch.tensor(coef_PC, dtype=torch.float32).to(device, non_blocking=True)
        _adamw_kernel[(tensor_B.numel(),)](
            ptr_P4,
            numel_P,
            coef_PC,
            tensor_B,
            block_B,
            DTYPE=_TL_DTYPES[dtype],
            C=_C,
            BLOCK=_BLOCK,
            num_warps=8,
        )


def _check(p: torch.Tensor, state: dict) -> None:
    """Refuse what the kernel cannot update (it reads the four tensors as flat arrays of p's dtype),
    naming the parameter's shape."""
    g = p.grad
    if p.dtype not in _TL_DTYPES:
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
    if any(x.data_ptr() % 16 for x in (p, g, state["exp_avg"], state["exp_avg_sq"])):
        raise ValueError(
            f"AdamW: the parameter of shape {tuple(p.shape)}, its gradient and state must start at "
            f"16-byte aligned addresses (a view at an offset into another tensor may not)"
        )
    if p.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"AdamW: the parameter of shape {tuple(p.shape)} is on {p.device}; the Triton step needs a GPU"
        )
