"""The one place that reads FlashFuseMoE's environment variables.

Read at call time (never at import time), so a test or a launcher can set them late.

- ``FLASHFUSEMOE_BACKEND``: expert compute backend name (``torch``, ``triton``) when no argument names one.
- ``FLASHFUSEMOE_COMM``: communicator name, or ``module:Class`` / ``module:factory``, when no argument
  names one.
- ``FLASHFUSEMOE_GEMM``: the triton backend's expert GEMMs: ``auto``, ``quack`` (all six on QuACK's
  kernels, required), ``quack-wgrad`` (its two weight gradients on them, required) or ``triton`` (ours
  and ``torch._grouped_mm``); read on each call of the experts (default: ``auto``; see
  ``backends/triton/quack_gemm.py``).
- ``TRITON_INTERPRET`` (Triton's own): when "1", Triton kernels run on the CPU interpreter, so the
  ``triton`` backend is usable on CPU tensors (fp32, small shapes: how CI tests the kernels). Triton
  reads it when a kernel is defined, so the ``triton`` backend takes its value when it is imported.
``FLASHFUSEMOE_BACKEND`` is read once per ``MoELayer`` (at construction) and on each call of
``fused_moe(backend=None)``.
"""

from __future__ import annotations

import os

__all__ = ["backend_from_env", "comm_from_env", "gemm_from_env", "triton_interpret"]


def _read(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def backend_from_env() -> str | None:
    """The backend named by ``FLASHFUSEMOE_BACKEND``, or None when unset/empty."""
    return _read("FLASHFUSEMOE_BACKEND")


def comm_from_env() -> str | None:
    """The communicator named by ``FLASHFUSEMOE_COMM``, or None when unset/empty."""
    return _read("FLASHFUSEMOE_COMM")


def gemm_from_env() -> str | None:
    """The expert GEMM path named by ``FLASHFUSEMOE_GEMM``, or None when unset/empty."""
    return _read("FLASHFUSEMOE_GEMM")


def triton_interpret() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return _read("TRITON_INTERPRET") == "1"
