"""The router's losses of one ``fused_moe`` call (its ``losses`` dict): the load-balance loss over this
call's tokens or over a group's global batch (Qwen), DeepSeek-V3's sequence-wise balance loss, the
z-loss; and the checks of their arguments.

The batch load-balance loss and the z-loss come from the backend's router (fused on ``triton``); the
global-batch and sequence-wise variants are torch ops on the router logits, the same on every backend,
run only when their coefficient is not 0.

Legend: T tokens (this rank), K top-k, E experts (global), B sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashfusemoe.backends.torch.routing import balance_probs, scores_from_logits, sequence_balance_loss
from flashfusemoe.comm import all_reduce_sum, group_size
from flashfusemoe.spec import RouterConfig, Routing, check_float, check_int

__all__ = ["RouterLosses"]


@dataclass(frozen=True)
class RouterLosses:
    """The loss settings of a call (``fused_moe``'s arguments of the same names)."""

    aux_loss_coeff: float = 0.0
    aux_loss_group: object | None = None
    z_loss_coeff: float = 0.0
    seq_aux_loss_coeff: float = 0.0
    seq_len: int | None = None

    def check(self, T: int, router: RouterConfig) -> None:
        """Each setting, for T tokens routed by ``router``: a clear error naming a bad one."""
        check_float("aux_loss_coeff", self.aux_loss_coeff)
        check_float("z_loss_coeff", self.z_loss_coeff)
        check_float("seq_aux_loss_coeff", self.seq_aux_loss_coeff)
        if self.seq_len is not None and check_int("seq_len", self.seq_len, 1) and T % self.seq_len:
            raise ValueError(
                f"seq_len={self.seq_len} must divide the number of tokens T={T} (T / seq_len sequences)"
            )
        if self.aux_loss_group is not None:
            group_size(self.aux_loss_group, "aux_loss_group")  # a group, or a TypeError naming it
        counting = [f"seq_aux_loss_coeff={self.seq_aux_loss_coeff}"] if self.seq_aux_loss_coeff else []
        if self.aux_loss_coeff and self.aux_loss_group is not None:
            counting.append(f"aux_loss_group with aux_loss_coeff={self.aux_loss_coeff}")
        if counting and router.capacity_factor is not None:
            raise ValueError(
                f"{counting[0]} needs dropless routing: its balance loss counts the selection, which "
                f"capacity_factor={router.capacity_factor} would drop from; use the batch aux_loss_coeff"
            )

    def __call__(self, logits_TE: torch.Tensor, routing: Routing, router: RouterConfig) -> dict:
        """``aux_loss``, ``z_loss``, ``seq_aux_loss`` (weighted, fp32 scalars that backprop into the
        logits) and the detached telemetry ``tokens_per_expert`` and ``dropped_slots``."""
        lb_loss = routing.load_balance_loss
        if self.aux_loss_coeff and self.aux_loss_group is not None:
            lb_loss = _group_balance_loss(logits_TE, routing, self.aux_loss_group, router.score_func)
        seq_loss = routing.load_balance_loss  # times 0: zero, connected to the graph as the others'
        if self.seq_aux_loss_coeff:
            T = logits_TE.shape[0]
            seq_loss = sequence_balance_loss(
                logits_TE, routing.topk_ids_TK, self.seq_len or T, router.score_func
            )
        return {
            "aux_loss": self.aux_loss_coeff * lb_loss,
            "z_loss": self.z_loss_coeff * routing.z_loss,
            "seq_aux_loss": self.seq_aux_loss_coeff * seq_loss,
            "tokens_per_expert": routing.tokens_per_expert_E.detach(),
            "dropped_slots": routing.dropped_slots.detach(),
        }


def _group_balance_loss(logits_TE, routing: Routing, group, score_func: str) -> torch.Tensor:
    """The load-balance loss with ``f_e`` from the routed slots of every rank of ``group`` (a sum
    all-reduce of this rank's ``[E]`` counts: dropless, so the routing's kept slots) and ``P_e`` from
    this rank's T tokens (0 when T = 0)."""
    T = logits_TE.shape[0]
    routed_E = routing.tokens_per_expert_E.clone()  # the telemetry stays this rank's
    all_reduce_sum(routed_E, group, "the aux loss's routed slots")
    prob_mean_E = balance_probs(scores_from_logits(logits_TE, score_func), score_func).sum(0) / max(T, 1)
    return routed_E.shape[0] * (routed_E / routed_E.sum().clamp(min=1) * prob_mean_E).sum()
