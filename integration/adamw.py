"""AdamW whose update is one Triton kernel launch per parameter tensor (``AdamW``), for the LM example.

torch's ``fused=True`` AdamW moves its bytes at 2.8 TB/s on an H200 (seed-1b: 1.16B bf16 parameters in
165 tensors, 5.8 ms of kernels a step); this kernel at 3.7 TB/s (4.3 ms; a device-to-device copy of
as many bytes runs at 4.3 TB/s). It is torch's optimizer with another ``step``: the same
hyperparameters, the same state (``exp_avg``, ``exp_avg_sq`` in the parameter's dtype, ``step`` a CPU
tensor, or with ``capturable=True`` one on the parameter's device), the same state dict, and fp32
arithmetic per element from the stored values, each result rounded once (as torch's fused kernel):

    p *= 1 - lr * wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

The coefficients come from the host (each tensor has its own step count and group), so the step never
waits for the GPU; with ``capturable=True`` the kernel computes them from device memory (a CUDA graph
can then replay the step). One launch per tensor: a single launch over all of them through tables of
addresses measured 2.1 TB/s (dependent loads before each block's data).

``step_in_backward=True`` starts each tensor's update as soon as backward has accumulated its gradient,
on a side stream, so that the optimizer's memory-bound kernels run beside the rest of the backward's
GEMMs; ``step()`` then updates what backward did not reach and makes the current stream wait for the
side stream. The result is the same step, bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
import triton
import triton.language as tl

from flashfusemoe.backends.triton.launch import cdiv, fast_launch
from flashfusemoe.spec import check_bool

__all__ = ["AdamW"]

_BLOCK = 4096  # elements a program updates (H200, seed-1b: 8192 12% slower)
_UNSUPPORTED = ("amsgrad", "maximize", "differentiable", "fused")
# Read once, as Triton reads it when the kernel is defined (and a per-parameter environment lookup
# would cost the step ~0.3 ms of host time over seed-1b's 165 tensors)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _update(
    p_ptr, g_ptr, m_ptr, v_ptr, n, decay, step_size, bc2_sqrt, eps, b1, c1, b2, c2, BLOCK: tl.constexpr
):
    """This program's BLOCK elements of one tensor, in fp32 from the stored values; the coefficients as
    in ``_coefficients``."""
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


@fast_launch
@triton.jit
def _adamw_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, n, decay, step_size, bc2_sqrt, eps, b1, c1, b2, c2, BLOCK: tl.constexpr
):
    """The coefficients from the host (fp32 arguments rounded from doubles)."""
    _update(p_ptr, g_ptr, m_ptr, v_ptr, n, decay, step_size, bc2_sqrt, eps, b1, c1, b2, c2, BLOCK)


@fast_launch
@triton.jit
def _adamw_device_kernel(p_ptr, g_ptr, m_ptr, v_ptr, n, step_ptr, hp_ptr, BLOCK: tl.constexpr):
    """The coefficients from device memory (``capturable``: a CUDA graph replays them with each step):
    the step count ``t`` (fp32, already incremented) and the group's ``_hyperparameters`` (fp64), in
    double as ``_coefficients`` computes them on the host, then rounded to fp32 as its arguments are."""
    t = tl.load(step_ptr).to(tl.float64)
    lr, wd, log_b1, log_b2 = tl.load(hp_ptr), tl.load(hp_ptr + 1), tl.load(hp_ptr + 2), tl.load(hp_ptr + 3)
    b1, b2, eps = tl.load(hp_ptr + 4), tl.load(hp_ptr + 5), tl.load(hp_ptr + 6)
    step_size = lr / (1 - tl.exp(t * log_b1))
    bc2_sqrt = tl.sqrt(1 - tl.exp(t * log_b2))
    f32 = tl.float32
    _update(
        p_ptr, g_ptr, m_ptr, v_ptr, n, (1 - lr * wd).to(f32), step_size.to(f32), bc2_sqrt.to(f32),
        eps.to(f32), b1.to(f32), (1 - b1).to(f32), b2.to(f32), (1 - b2).to(f32), BLOCK,
    )  # fmt: skip


def _coefficients(group: dict, t: float) -> tuple[float, ...]:
    """1 - lr wd, lr / (1 - b1^t), sqrt(1 - b2^t), eps, b1, 1 - b1, b2, 1 - b2 at step t: in double on the
    host (1 - b2 from an fp32 b2 would be off by 1e-5 relative)."""
    lr, (b1, b2) = group["lr"], group["betas"]
    bias = (lr / (1 - b1**t), math.sqrt(1 - b2**t))
    return (1 - lr * group["weight_decay"], *bias, group["eps"], b1, 1 - b1, b2, 1 - b2)


def _hyperparameters(group: dict) -> tuple[float, ...]:
    """What ``_adamw_device_kernel`` reads at ``hp_ptr``: lr, wd, log b1, log b2, b1, b2, eps."""
    b1, b2 = group["betas"]
    return (group["lr"], group["weight_decay"], math.log(b1), math.log(b2), b1, b2, group["eps"])


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` (float ``lr``, no amsgrad / maximize / differentiable / fused: a clear
    error) whose ``step`` runs one Triton kernel per parameter tensor. Parameters must be dense fp32,
    bf16 or fp16 tensors on a GPU (on the CPU only under ``TRITON_INTERPRET=1``).

    ``capturable=True`` (torch's meaning): the step counts live on the parameters' device and the
    kernels read them and the group's hyperparameters from device memory, so a CUDA graph that
    captured ``step()`` replays real steps. The hyperparameters replayed are those of the last eager
    ``step()`` (the capture's): changing ``lr`` afterwards needs a new capture.

    ``step_in_backward=True``: a post-accumulate-grad hook on each parameter of the groups given here
    updates it as soon as backward has its gradient (on a side stream of its device; inline on the
    CPU), and ``step()`` updates the parameters whose gradient came otherwise (assigned by hand, or a
    group added later) and joins the side streams. So nothing may read or change a gradient between
    ``backward()`` and ``step()`` (clipping, an all-reduce, accumulation over micro-batches: a second
    backward before ``step()`` raises), and a parameter's values change while backward still runs (only
    its own gradient's consumers have read it by then)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        step_in_backward: bool = False,
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
        self._device_hp: dict[tuple[int, torch.device], tuple[tuple, torch.Tensor]] = {}
        self._side: dict[torch.device, torch.cuda.Stream] = {}  # step_in_backward's stream per device
        self._updated: set[int] = set()  # ids of the parameters a hook updated since the last step()
        if check_bool("step_in_backward", step_in_backward):
            for i, group in enumerate(self.param_groups):
                for p in group["params"]:
                    p.register_post_accumulate_grad_hook(functools.partial(self._update_in_backward, i))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = [  # everything is checked before anything is updated
            (p, self._state_of(p, group), group, i)
            for i, group in enumerate(self.param_groups)
            for p in group["params"]
            if p.grad is not None and id(p) not in self._updated
        ]
        device_steps = [state["step"] for _, state, group, _ in todo if group["capturable"]]
        if device_steps:  # one launch for all counts; the kernels read them incremented
            torch._foreach_add_(device_steps, 1.0)
        hps = {}  # (group, device) -> its hyperparameters on the device: looked up once a step
        for p, state, group, i in todo:
            if group["capturable"] and (i, p.device) not in hps:
                hps[i, p.device] = self._hyperparameters_on(i, group, p.device)
            self._launch(p, state, group, hps.get((i, p.device)))
        for device, side in self._side.items():  # the updates started in backward
            torch.cuda.current_stream(device).wait_stream(side)
        self._updated.clear()
        return loss

    @torch.no_grad()
    def _update_in_backward(self, i: int, p: torch.Tensor) -> None:
        """``step_in_backward``'s hook: group ``i``'s parameter ``p`` has its gradient for this step."""
        if id(p) in self._updated:
            raise RuntimeError(
                f"AdamW(step_in_backward=True): a second backward reached the parameter of shape "
                f"{tuple(p.shape)} before step(); accumulating gradients needs step_in_backward=False"
            )
        group = self.param_groups[i]
        state = self._state_of(p, group)
        hp = self._hyperparameters_on(i, group, p.device) if group["capturable"] else None
        with torch.cuda.stream(self._side_after_current(p.device)) if p.is_cuda else contextlib.nullcontext():
            if group["capturable"]:
                state["step"].add_(1)
            self._launch(p, state, group, hp)
        self._updated.add(id(p))

    def _side_after_current(self, device: torch.device) -> torch.cuda.Stream:
        """``device``'s side stream, ordered after what the current stream has queued (what produced
        the gradient), beside what it queues next."""
        side = self._side.get(device)
        if side is None:
            side = self._side[device] = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        return side

    def _state_of(self, p: torch.Tensor, group: dict) -> dict:
        """``p``'s state, created at its first step, checked, its step count where ``group`` keeps it (a
        state loaded from another AdamW's state dict moves)."""
        state = self.state[p]
        on = p.device if group["capturable"] else torch.device("cpu")
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=on)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        _check(p, state)
        if state["step"].device != on:
            state["step"] = state["step"].to(on, torch.float32)
        return state

    @staticmethod
    def _launch(p: torch.Tensor, state: dict, group: dict, hp: torch.Tensor | None) -> None:
        """Update ``p`` (its state's step already counted on the device when ``group`` is capturable,
        with ``hp`` its hyperparameters there; counted here otherwise)."""
        n = p.numel()
        if group["capturable"]:
            if n:
                _adamw_device_kernel[(cdiv(n, _BLOCK),)](
                    p, p.grad, state["exp_avg"], state["exp_avg_sq"], n, state["step"], hp,
                    BLOCK=_BLOCK, num_warps=8,
                )  # fmt: skip
            return
        state["step"] += 1
        if n:
            _adamw_kernel[(cdiv(n, _BLOCK),)](
                p, p.grad, state["exp_avg"], state["exp_avg_sq"], n,
                *_coefficients(group, state["step"].item()), BLOCK=_BLOCK, num_warps=8,
            )  # fmt: skip

    def _hyperparameters_on(self, i: int, group: dict, device: torch.device) -> torch.Tensor:
        """Group ``i``'s ``_hyperparameters`` as an fp64 tensor on ``device``: one tensor for the
        optimizer's life (a CUDA graph keeps its address), rewritten when the values change."""
        values, key = _hyperparameters(group), (i, device)
        cached = self._device_hp.get(key)
        if cached is not None and cached[0] == values:
            return cached[1]
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"AdamW: the hyperparameters of group {i} changed (or were never stepped) before this CUDA "
                "graph capture; run one eager step() with them first, so that they are on the device"
            )
        hp = torch.tensor(values, dtype=torch.float64)
        tensor = hp.to(device) if cached is None else cached[1].copy_(hp)
        self._device_hp[key] = (values, tensor)
        return tensor


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
