"""``torch.autocast`` for the layer: its GEMMs in the autocast dtype, as ``nn.Linear``'s are.

Our kernels sit behind custom ops that autocast does not see, so the entry points (``fused_moe``, the
HF experts function) cast their operands themselves. Inside an autocast region of the hidden states'
device type, every fp32 / bf16 / fp16 operand (hidden states, router and expert weights) is cast to the
autocast dtype, and the call runs with autocast off. So the result is, bit for bit, that of the same
call on the cast tensors outside autocast (routing still in fp32 from them); the output comes in the
autocast dtype, and fp32 weights get fp32 gradients through the casts. A leaf module: it imports
nothing of ours.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_operands"]

_CAST = (torch.float32, torch.bfloat16, torch.float16)  # what autocast casts (never fp64)


def autocast_operands(*tensors: torch.Tensor | None) -> tuple[tuple, contextlib.AbstractContextManager]:
    """``(tensors, context)``. Outside autocast (of the first tensor's device type): the tensors as
    given and a no-op context. Inside it: each fp32 / bf16 / fp16 tensor cast to the autocast dtype
    (anything else as given, fp64 included as autocast leaves it, for the caller's checks to name) and
    a context that turns autocast off."""
    x = tensors[0]
    kind = x.device.type if isinstance(x, torch.Tensor) else None
    if not (kind and torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)):
        return tensors, contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(kind)
    cast = tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _CAST else t for t in tensors)
    return cast, torch.autocast(kind, enabled=False)
