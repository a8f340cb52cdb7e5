"""Triton router: the fused kernels of router.py under one autograd.Function, returning the same
``Routing`` as the reference; the two loss scalars come out of the kernels and take their gradients
straight into the backward kernel, so no small torch ops run per step. Capacity dropping (optional, off
by default) reuses the reference's first-come-first-served rule on the kernel's top-k.

Legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import torch

from flashfusemoe.backends.torch.routing import drop_over_capacity
from flashfusemoe.backends.triton.ops import custom_op
from flashfusemoe.backends.triton.router import router_backward, router_forward
from flashfusemoe.spec import RouterConfig, Routing, check_first_order

__all__ = ["route"]


def _router_fwd_fake(logits_TE, expert_bias_E, router):
    T, E = logits_TE.shape
    K = RouterConfig.from_op_arg(router).top_k
    return (
        logits_TE.new_empty((T, K), dtype=torch.int32),
        logits_TE.new_empty((T, K)),
        logits_TE.new_empty((E + 1,), dtype=torch.int64),
        logits_TE.new_empty(()),
        logits_TE.new_empty(()),
    )


@custom_op("router_fwd", _router_fwd_fake)
def _router_fwd(
    logits_TE: torch.Tensor, expert_bias_E: torch.Tensor | None, router: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``router``: a ``RouterConfig.to_op_arg()`` (a custom op takes no dataclass)."""
    return router_forward(logits_TE, RouterConfig.from_op_arg(router), expert_bias_E)


def _router_bwd_fake(logits_TE, ids_TK, routed_E1, grad_w_TK, grad_lb, grad_z, router):
    return torch.empty_like(logits_TE)


@custom_op("router_bwd", _router_bwd_fake)
def _router_bwd(
    logits_TE: torch.Tensor,
    ids_TK: torch.Tensor,
    routed_E1: torch.Tensor,
    grad_w_TK: torch.Tensor | None,
    grad_lb: torch.Tensor | None,
    grad_z: torch.Tensor | None,
    router: str,
) -> torch.Tensor:
    cfg = RouterConfig.from_op_arg(router)
    return router_backward(logits_TE, ids_TK, routed_E1, grad_w_TK, grad_lb, grad_z, cfg)


class _Router(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, expert_bias_E, cfg: RouterConfig):
        ctx.router = cfg.to_op_arg()
        ids, w, routed, lb, z = _router_fwd(logits_TE, expert_bias_E, ctx.router)
        ctx.save_for_backward(logits_TE, ids, routed)
        ctx.mark_non_differentiable(ids, routed)
        return ids, w, routed, lb, z

    @staticmethod
    def backward(ctx, _g_ids, grad_w, _g_routed, grad_lb, grad_z):
        check_first_order("the triton backend's router")
        logits_TE, ids, routed = ctx.saved_tensors
        grad_logits = _router_bwd(logits_TE, ids, routed, grad_w, grad_lb, grad_z, ctx.router)
        return grad_logits, None, None


def route(logits_TE: torch.Tensor, cfg: RouterConfig, expert_bias_E: torch.Tensor | None = None) -> Routing:
    """Same contract as the reference ``route`` (ids are int32 here)."""
    E = logits_TE.shape[1]
    logits_TE = logits_TE.float().contiguous()
    ids_TK, weights_TK, routed_E1, lb_loss, z_loss = _Router.apply(logits_TE, expert_bias_E, cfg)
    if cfg.capacity_factor is None:
        return Routing(weights_TK, ids_TK, routed_E1[:E], lb_loss, z_loss, routed_E1[E])
    ids_TK, weights_TK, kept_E, dropped = drop_over_capacity(ids_TK, weights_TK, E, cfg.capacity_factor)
    return Routing(weights_TK, ids_TK, kept_E, lb_loss, z_loss, dropped)
