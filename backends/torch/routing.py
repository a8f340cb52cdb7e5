"""Reference router: logits -> top-k expert ids, combine weights and auxiliary-loss statistics.

Pure PyTorch, fp32, written for clarity; the executable specification of docs/fused_moe.md "Router".

Legend: T tokens, E experts, K top-k, G expert groups, N = T*K slots.
"""

from __future__ import annotations

import math

import torch

from flashfusemoe.spec import RouterConfig, Routing

__all__ = ["capacity_keep", "route", "router_logits", "scores_from_logits"]


def router_logits(hidden_states_TD: torch.Tensor, gate_weight_ED: torch.Tensor) -> torch.Tensor:
    """fp32 router logits ``[T, E] = x @ gate_weight.T`` on upcast inputs (the router runs in fp32)."""
    return hidden_states_TD.float() @ gate_weight_ED.float().t()


def scores_from_logits(logits_TE: torch.Tensor, score_func: str) -> torch.Tensor:
    """Per-expert routing scores in fp32: softmax over E, or elementwise sigmoid."""
    logits_TE = logits_TE.float()
    return logits_TE.softmax(-1) if score_func == "softmax" else logits_TE.sigmoid()


def _group_mask(select_TE: torch.Tensor, cfg: RouterConfig) -> torch.Tensor:
    """Keep only experts of the ``topk_groups`` best groups; a group scores the sum of its top-2
    selection scores (its top-1 when a group has a single expert), as in DeepSeek-V3."""
    T, E = select_TE.shape
    G = cfg.num_groups
    per_group = select_TE.view(T, G, E // G)
    group_score_TG = per_group.topk(min(2, E // G), dim=-1).values.sum(-1)
    best_groups = group_score_TG.topk(cfg.topk_groups, dim=-1).indices
    keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, best_groups, True)
    keep_TE = keep_TG.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)
    return select_TE.masked_fill(~keep_TE, float("-inf"))


def capacity_keep(topk_ids_TK: torch.Tensor, num_experts: int, capacity_factor: float) -> torch.Tensor:
    """Slots that fit their expert's capacity, first come first served in (token, k) order."""
    T, K = topk_ids_TK.shape
    capacity = math.ceil(capacity_factor * T * K / num_experts)
    one_hot_NE = torch.nn.functional.one_hot(topk_ids_TK.reshape(-1), num_experts)
    position_N = (one_hot_NE.cumsum(0) * one_hot_NE).sum(-1) - 1
    return (position_N < capacity).view(T, K)


def route(logits_TE: torch.Tensor, cfg: RouterConfig, expert_bias_E: torch.Tensor | None = None) -> Routing:
    """Route T tokens given router logits ``[T, E]`` (any float dtype; computed in fp32).

    ``expert_bias_E`` (fp32 ``[E]``) is added to the scores for selection only; weights use the
    unbiased scores.
    """
    T, E = logits_TE.shape
    K = cfg.top_k
    logits_TE = logits_TE.float()
    scores_TE = scores_from_logits(logits_TE, cfg.score_func)
    select_TE = scores_TE.detach()
    if expert_bias_E is not None:
        select_TE = select_TE + expert_bias_E.detach().float()
    if cfg.num_groups is not None:
        select_TE = _group_mask(select_TE, cfg)
    topk_ids_TK = select_TE.topk(K, dim=-1).indices
    weights_TK = scores_TE.gather(1, topk_ids_TK)
    if cfg.renormalize:
        weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
    weights_TK = weights_TK * cfg.routed_scaling_factor

    # Statistics of the routing before any capacity drop: they measure the router's preference.
    routed_E = torch.bincount(topk_ids_TK.reshape(-1), minlength=E)
    if T > 0:
        probs_TE = scores_TE if cfg.score_func == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True)
        frac_routed_E = routed_E.float() / (T * K)
        load_balance_loss = E * (frac_routed_E * probs_TE.mean(0)).sum()
        z_loss = torch.logsumexp(logits_TE, dim=-1).square().mean()
    else:
        load_balance_loss = z_loss = logits_TE.sum() * 0.0  # keeps the graph connected

    dropped = torch.zeros((), dtype=torch.int64, device=logits_TE.device)
    if cfg.capacity_factor is not None:
        keep_TK = capacity_keep(topk_ids_TK, E, cfg.capacity_factor)
        dropped = (~keep_TK).sum()
        topk_ids_TK = torch.where(keep_TK, topk_ids_TK, -1)
        weights_TK = torch.where(keep_TK, weights_TK, 0.0)
    kept_ids_N = topk_ids_TK.reshape(-1)
    tokens_per_expert_E = torch.bincount(kept_ids_N[kept_ids_N >= 0], minlength=E)
    return Routing(weights_TK, topk_ids_TK, tokens_per_expert_E, load_balance_loss, z_loss, dropped)
