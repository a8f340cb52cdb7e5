"""Triton router: the fused epilogue kernels of router.py under one autograd.Function, returning the
same ``Routing`` as the reference. Capacity dropping (optional, off by default) reuses the reference's
first-come-first-served rule on the kernel's top-k.

Legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import torch

from flashfusemoe.backends.torch.routing import drop_over_capacity, load_balance_loss
from flashfusemoe.backends.triton.router import router_backward, router_forward
from flashfusemoe.spec import RouterConfig, Routing

__all__ = ["route"]


@torch.library.custom_op("flashfusemoe::router_fwd", mutates_args=())
def _router_fwd(
    logits_TE: torch.Tensor,
    expert_bias_E: torch.Tensor | None,
    top_k: int,
    score_func: str,
    renormalize: bool,
    num_groups: int,
    topk_groups: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = RouterConfig(top_k, score_func, renormalize, num_groups or None, topk_groups or None, scale)
    return router_forward(logits_TE, cfg, expert_bias_E)


@_router_fwd.register_fake
def _(logits_TE, expert_bias_E, top_k, score_func, renormalize, num_groups, topk_groups, scale):
    T, E = logits_TE.shape
    f32 = dict(dtype=torch.float32)
    return (
        logits_TE.new_empty((T, top_k), dtype=torch.int32),
        logits_TE.new_empty((T, top_k), **f32),
        logits_TE.new_empty((T,), **f32),
        logits_TE.new_empty((E,), **f32),
        logits_TE.new_empty((E,), dtype=torch.int32),
    )


@torch.library.custom_op("flashfusemoe::router_bwd", mutates_args=())
def _router_bwd(
    logits_TE: torch.Tensor,
    ids_TK: torch.Tensor,
    grad_w_TK: torch.Tensor,
    grad_prob_sum_E: torch.Tensor,
    grad_lse_T: torch.Tensor,
    top_k: int,
    score_func: str,
    renormalize: bool,
    scale: float,
) -> torch.Tensor:
    cfg = RouterConfig(top_k, score_func, renormalize, routed_scaling_factor=scale)
    return router_backward(logits_TE, ids_TK, grad_w_TK, grad_prob_sum_E, grad_lse_T, cfg)


@_router_bwd.register_fake
def _(logits_TE, ids_TK, grad_w_TK, grad_prob_sum_E, grad_lse_T, top_k, score_func, renormalize, scale):
    return torch.empty_like(logits_TE)


class _Router(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, expert_bias_E, cfg: RouterConfig):
        ids, w, lse, prob_sum, routed = _router_fwd(
            logits_TE,
            expert_bias_E,
            cfg.top_k,
            cfg.score_func,
            cfg.renormalize,
            cfg.num_groups or 0,
            cfg.topk_groups or 0,
            float(cfg.routed_scaling_factor),
        )
        ctx.save_for_backward(logits_TE, ids)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(ids, routed)
        return ids, w, lse, prob_sum, routed

    @staticmethod
    def backward(ctx, _g_ids, grad_w, grad_lse, grad_prob_sum, _g_routed):
        logits_TE, ids = ctx.saved_tensors
        cfg = ctx.cfg
        T, E = logits_TE.shape
        grad_w = grad_w if grad_w is not None else logits_TE.new_zeros(ids.shape)
        grad_lse = grad_lse if grad_lse is not None else logits_TE.new_zeros(T)
        grad_prob_sum = grad_prob_sum if grad_prob_sum is not None else logits_TE.new_zeros(E)
        grad_logits = _router_bwd(
            logits_TE,
            ids,
            grad_w,
            grad_prob_sum,
            grad_lse,
            cfg.top_k,
            cfg.score_func,
            cfg.renormalize,
            float(cfg.routed_scaling_factor),
        )
        return grad_logits, None, None


def route(logits_TE: torch.Tensor, cfg: RouterConfig, expert_bias_E: torch.Tensor | None = None) -> Routing:
    """Same contract as the reference ``route`` (ids are int32 here)."""
    T, E = logits_TE.shape
    K = cfg.top_k
    ids_TK, weights_TK, lse_T, prob_sum_E, routed_E = _Router.apply(
        logits_TE.float().contiguous(), expert_bias_E, cfg
    )
    if T:
        lb_loss = load_balance_loss(routed_E, prob_sum_E, T, K)
        z_loss = lse_T.square().mean()
    else:
        lb_loss = z_loss = prob_sum_E.sum() * 0.0
    dropped = torch.zeros((), dtype=torch.int64, device=logits_TE.device)
    tokens_per_expert_E = routed_E.long()
    if cfg.capacity_factor is not None:
        ids_TK, weights_TK, tokens_per_expert_E, dropped = drop_over_capacity(
            ids_TK, weights_TK, E, cfg.capacity_factor
        )
    return Routing(weights_TK, ids_TK, tokens_per_expert_E, lb_loss, z_loss, dropped)
