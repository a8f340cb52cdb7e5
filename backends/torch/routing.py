"""Reference router: logits -> top-k expert ids, combine weights and auxiliary-loss statistics.

Pure PyTorch, fp32, written for clarity; the executable specification of docs/fused_moe.md "Router".

Legend: T tokens, E experts, K top-k, G expert groups, N = T*K slots.
"""

from __future__ import annotations

import math

import torch

from flashfusemoe.spec import RouterConfig, Routing

__all__ = [
    "balance_probs",
    "drop_over_capacity",
    "load_balance_loss",
    "route",
    "router_logits",
    "scores_from_logits",
    "sequence_balance_loss",
]


def router_logits(hidden_states_TD: torch.Tensor, gate_weight_ED: torch.Tensor) -> torch.Tensor:
    """fp32 router logits ``[T, E] = x @ gate_weight.T`` on upcast inputs (the router runs in fp32)."""
    return hidden_states_TD.float() @ gate_weight_ED.float().t()


def scores_from_logits(logits_TE: torch.Tensor, score_func: str) -> torch.Tensor:
    """Per-expert routing scores in fp32: softmax over E, or elementwise sigmoid."""
    logits_TE = logits_TE.float()
    return logits_TE.softmax(-1) if score_func == "softmax" else logits_TE.sigmoid()


def _top_k(values_TX: torch.Tensor, k: int, allowed_TX: torch.Tensor | None = None) -> torch.Tensor:
    """The selection rule: indices of the k largest values per row, a NaN counting as -inf, ties to
    the lowest index, each index once; with ``allowed``, allowed indices rank before all others."""
    values_TX = torch.where(torch.isnan(values_TX), float("-inf"), values_TX)
    order_TX = torch.sort(values_TX, dim=-1, descending=True, stable=True).indices
    if allowed_TX is not None:  # a stable sort by allowed keeps the value order within each class
        rank_TX = (~allowed_TX.gather(1, order_TX)).to(torch.int8)
        order_TX = order_TX.gather(1, torch.sort(rank_TX, dim=-1, stable=True).indices)
    return order_TX[:, :k]


def _group_allowed(select_TE: torch.Tensor, cfg: RouterConfig) -> torch.Tensor:
    """Experts of the ``topk_groups`` best groups; a group scores the sum of its top-2 selection
    scores (its top-1 when a group has a single expert), as in DeepSeek-V3."""
    T, E = select_TE.shape
    G = cfg.num_groups
    per_group = torch.where(torch.isnan(select_TE), float("-inf"), select_TE).view(T, G, E // G)
    group_score_TG = per_group.topk(min(2, E // G), dim=-1).values.sum(-1)
    best_groups = _top_k(group_score_TG, cfg.topk_groups)
    keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, best_groups, True)
    return keep_TG.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)


def _capacity_keep(topk_ids_TK: torch.Tensor, num_experts: int, capacity_factor: float) -> torch.Tensor:
    """Slots that fit their expert's capacity, first come first served in (token, k) order."""
    T, K = topk_ids_TK.shape
    capacity = math.ceil(capacity_factor * T * K / num_experts)
    one_hot_NE = torch.nn.functional.one_hot(topk_ids_TK.reshape(-1), num_experts)
    position_N = (one_hot_NE.cumsum(0) * one_hot_NE).sum(-1) - 1
    return (position_N < capacity).view(T, K)


def drop_over_capacity(
    topk_ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int, capacity_factor: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply the capacity limit: returns ids (-1 where dropped), weights (0 where dropped), kept slots
    per expert ``[E]`` int64 and the dropped-slot count (no host sync)."""
    keep_TK = _capacity_keep(topk_ids_TK.long(), num_experts, capacity_factor)
    topk_ids_TK = torch.where(keep_TK, topk_ids_TK, -1)
    weights_TK = torch.where(keep_TK, weights_TK, 0.0)
    kept_N = topk_ids_TK.reshape(-1).long()
    tokens_per_expert_E = torch.zeros(num_experts, dtype=torch.int64, device=kept_N.device).index_add_(
        0, kept_N.clamp(min=0), (kept_N >= 0).long()
    )
    return topk_ids_TK, weights_TK, tokens_per_expert_E, (~keep_TK).sum()


def balance_probs(scores_TE: torch.Tensor, score_func: str) -> torch.Tensor:
    """The per-token expert probabilities of the balance losses: the softmax scores, or the sigmoid
    scores normalized to sum to 1 over the experts."""
    return scores_TE if score_func == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True)


def load_balance_loss(
    routed_E: torch.Tensor, prob_sum_E: torch.Tensor, num_tokens: int, top_k: int
) -> torch.Tensor:
    """Switch load-balance loss ``E * sum_e f_e * P_e`` from the slots routed per expert (``f`` after
    dividing by T*K, no gradient) and the per-expert sum over tokens of the normalized scores (``P``
    after dividing by T). T must be > 0."""
    E = routed_E.shape[0]
    return E * (routed_E.float() / (num_tokens * top_k) * prob_sum_E / num_tokens).sum()


def sequence_balance_loss(
    logits_TE: torch.Tensor, topk_ids_TK: torch.Tensor, seq_len: int, score_func: str
) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, unweighted: the load-balance loss of each sequence of
    ``seq_len`` consecutive tokens (``E * sum_e f_e * P_e``, ``f_e`` its slots routed to e over
    ``seq_len * K``, ``P_e`` its mean normalized score, as ``load_balance_loss`` for one sequence),
    averaged over the ``T / seq_len`` sequences. ``topk_ids_TK``: the selection, ids in ``[0, E)``
    (no capacity dropping). fp32 scalar, differentiable in the logits; 0 when T = 0."""
    T, E = logits_TE.shape
    K = topk_ids_TK.shape[1]
    if T == 0:
        return logits_TE.float().sum() * 0.0  # keeps the graph connected
    probs_TE = balance_probs(scores_from_logits(logits_TE, score_func), score_func)
    B = T // seq_len
    mean_prob_BE = probs_TE.view(B, seq_len, E).mean(1)
    ids_BN = topk_ids_TK.reshape(B, seq_len * K).long()
    # integer counts: exact in any summation order; scatter_add keeps the shapes static for compile
    routed_BE = torch.zeros(B, E, dtype=torch.int64, device=logits_TE.device)
    routed_BE = routed_BE.scatter_add_(1, ids_BN, torch.ones_like(ids_BN)).float()
    return (E * (routed_BE / (seq_len * K) * mean_prob_BE).sum(-1)).mean()


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
    allowed_TE = _group_allowed(select_TE, cfg) if cfg.num_groups is not None else None
    topk_ids_TK = _top_k(select_TE, K, allowed_TE)
    weights_TK = scores_TE.gather(1, topk_ids_TK)
    if cfg.renormalize:
        weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
    weights_TK = weights_TK * cfg.routed_scaling_factor
    # a NaN logit makes its token's weights NaN (all K), whatever was selected
    weights_TK = torch.where(torch.isnan(logits_TE).any(-1, keepdim=True), float("nan"), weights_TK)

    # Statistics of the routing before any capacity drop: they measure the router's preference.
    routed_E = torch.bincount(topk_ids_TK.reshape(-1), minlength=E)
    if T > 0:
        lb_loss = load_balance_loss(routed_E, balance_probs(scores_TE, cfg.score_func).sum(0), T, K)
        z_loss = torch.logsumexp(logits_TE, dim=-1).square().mean()
    else:
        lb_loss = z_loss = logits_TE.sum() * 0.0  # keeps the graph connected

    dropped = torch.zeros((), dtype=torch.int64, device=logits_TE.device)
    tokens_per_expert_E = routed_E
    if cfg.capacity_factor is not None:
        topk_ids_TK, weights_TK, tokens_per_expert_E, dropped = drop_over_capacity(
            topk_ids_TK, weights_TK, E, cfg.capacity_factor
        )
    return Routing(weights_TK, topk_ids_TK, tokens_per_expert_E, lb_loss, z_loss, dropped)
