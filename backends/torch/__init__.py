"""The ``torch`` backend: pure-PyTorch reference of routing and experts. Runs anywhere torch runs; the
oracle of every test and the unfused baseline of every benchmark."""

from __future__ import annotations

import torch

from flashfusemoe.backends.torch.dense import dense_experts
from flashfusemoe.backends.torch.experts import expert_mlp, experts
from flashfusemoe.backends.torch.routing import route, router_logits

NAME = "torch"

__all__ = [
    "NAME",
    "dense_experts",
    "expert_mlp",
    "experts",
    "route",
    "router_logits",
    "unavailable_reason",
]


def unavailable_reason(device: torch.device) -> str | None:
    """None: this backend runs on every device."""
    return None
