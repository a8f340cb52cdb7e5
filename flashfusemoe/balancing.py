"""Aux-loss-free load balancing (DeepSeek-V3): nudge a per-expert selection bias after each step.

Legend: E experts.
"""

from __future__ import annotations

import torch

from flashfusemoe.spec import check_float

__all__ = ["update_expert_bias"]


def update_expert_bias(
    expert_bias_E: torch.Tensor, tokens_per_expert_E: torch.Tensor, rate: float = 1e-3
) -> torch.Tensor:
    """Return ``bias + rate * sign(mean(count) - count)``: overloaded experts become less likely to be
    selected, underloaded ones more. ``tokens_per_expert_E`` is the step's count (summed over
    micro-batches and data-parallel ranks by the caller if wanted). The input is not modified."""
    for name, t in (("expert_bias", expert_bias_E), ("tokens_per_expert", tokens_per_expert_E)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D tensor [E], got {getattr(t, 'shape', type(t).__name__)}")
    if not expert_bias_E.is_floating_point():
        raise TypeError(f"expert_bias must be a floating tensor, got {expert_bias_E.dtype}")
    if tokens_per_expert_E.dtype == torch.bool or tokens_per_expert_E.is_complex():
        raise TypeError(f"tokens_per_expert must hold counts, got {tokens_per_expert_E.dtype}")
    check_float("rate", rate)
    if expert_bias_E.shape != tokens_per_expert_E.shape:
        raise ValueError(
            f"tokens_per_expert shape {tuple(tokens_per_expert_E.shape)} must match expert_bias shape "
            f"{tuple(expert_bias_E.shape)}"
        )
    counts_E = tokens_per_expert_E.float()
    return expert_bias_E + rate * torch.sign(counts_E.mean() - counts_E).to(expert_bias_E.dtype)
