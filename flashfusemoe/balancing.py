"""Aux-loss-free load balancing (DeepSeek-V3): nudge a per-expert selection bias after each step.

Legend: E experts.
"""

from __future__ import annotations

import torch

__all__ = ["update_expert_bias"]


def update_expert_bias(
    expert_bias_E: torch.Tensor, tokens_per_expert_E: torch.Tensor, rate: float = 1e-3
) -> torch.Tensor:
    """Return ``bias + rate * sign(mean(count) - count)``: overloaded experts become less likely to be
    selected, underloaded ones more. ``tokens_per_expert_E`` is the step's count (summed over
    micro-batches and data-parallel ranks by the caller if wanted). The input is not modified."""
    if expert_bias_E.shape != tokens_per_expert_E.shape:
        raise ValueError(
            f"tokens_per_expert shape {tuple(tokens_per_expert_E.shape)} must match expert_bias shape "
            f"{tuple(expert_bias_E.shape)}"
        )
    counts_E = tokens_per_expert_E.float()
    return expert_bias_E + rate * torch.sign(counts_E.mean() - counts_E).to(expert_bias_E.dtype)
