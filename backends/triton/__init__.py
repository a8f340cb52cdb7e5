"""The ``triton`` backend: fused Triton kernels for every non-GEMM step of the MoE layer, grouped GEMMs
through ``torch._grouped_mm`` or our Triton kernel (whichever runs and is faster for the shape), or on
QuACK's kernels where they are installed and measured faster (``quack_gemm.py``).

Runs on CUDA tensors; on CPU tensors only under ``TRITON_INTERPRET=1`` (fp32, small shapes: tests).
"""

from __future__ import annotations

import torch

from flashfusemoe import _env
from flashfusemoe.backends.triton.experts import experts
from flashfusemoe.backends.triton.mlp import expert_mlp
from flashfusemoe.backends.triton.router_gemm import router_logits
from flashfusemoe.backends.triton.routing import route

NAME = "triton"

__all__ = ["NAME", "expert_mlp", "experts", "route", "router_logits", "unavailable_reason"]


# Triton reads TRITON_INTERPRET when a kernel is defined, i.e. when this package was imported: that
# value, not the current one, says whether the kernels run on the CPU interpreter.
_INTERPRETED = _env.triton_interpret()


def unavailable_reason(device: torch.device) -> str | None:
    """Why this backend cannot run on ``device``, or None."""
    if device.type == "cuda" or (device.type == "cpu" and _INTERPRETED):
        return None
    if device.type == "cpu" and _env.triton_interpret():
        return (
            "TRITON_INTERPRET=1 was set after the triton backend was imported, and Triton reads it when "
            "kernels are defined: set it before importing flashfusemoe"
        )
    return f"needs CUDA tensors (or TRITON_INTERPRET=1, set before import, for CPU), got device {device}"
