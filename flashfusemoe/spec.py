"""Shared vocabulary of FlashFuseMoE: activations, router settings, argument checks.

A leaf module: it imports nothing else of ours, so the layer, every backend and every communicator can
import it without cycles.

Legend: T tokens (this rank), K top-k, E experts (global), e local experts, D model dim,
I expert intermediate dim, F rows of ``w_up`` (2I for GLU activations, I otherwise), N = T*K slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "GLU_ACTIVATIONS",
    "SCORE_FUNCS",
    "RouterConfig",
    "Routing",
    "activate",
    "check_bool",
    "check_device",
    "check_expert_weights",
    "check_first_order",
    "check_float",
    "check_int",
    "check_hidden",
    "check_topk",
    "is_glu",
    "sort_slots_by_expert",
]

GLU_ACTIVATIONS = ("swiglu", "geglu")
ACTIVATIONS = GLU_ACTIVATIONS + ("relu", "gelu", "silu", "relu2")
SCORE_FUNCS = ("softmax", "sigmoid")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def is_glu(activation: str) -> bool:
    """True when ``w_up`` holds gate rows then up rows (``F = 2I``)."""
    check_activation(activation)
    return activation in GLU_ACTIVATIONS


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported; expected one of {ACTIVATIONS}")


def activate(h_NF: torch.Tensor, activation: str) -> torch.Tensor:
    """Expert activation on up-projection rows ``h_NF``; returns ``[N, I]``.

    GLU: ``act(h[:, :I]) * h[:, I:]`` (gate columns first, as in HF transformers v5 ``gate_up_proj``);
    swiglu uses SiLU and geglu the exact (erf) GELU. Plain: ``relu``, ``gelu`` (erf), ``silu``,
    ``relu2`` = ``relu(x)**2``.
    """
    if activation in GLU_ACTIVATIONS:
        gate, up = h_NF.chunk(2, dim=-1)
        return (F.silu(gate) if activation == "swiglu" else F.gelu(gate)) * up
    if activation == "relu":
        return F.relu(h_NF)
    if activation == "gelu":
        return F.gelu(h_NF)
    if activation == "silu":
        return F.silu(h_NF)
    if activation == "relu2":
        return F.relu(h_NF).square()
    check_activation(activation)
    raise AssertionError("unreachable")


def check_int(
    name: str, value: object, lo: int | None = None, hi: int | None = None, hi_name: str = ""
) -> int:
    """``value`` must be an int (not a bool) in ``[lo, hi]``: TypeError for the type, ValueError for
    the range; both name ``name`` and the expected range."""
    upper = "inf" if hi is None else f"{hi_name}={hi}" if hi_name else str(hi)
    bounds = f" in [{'-inf' if lo is None else lo}, {upper}]"
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be an int{bounds}, got {type(value).__name__}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name}={value!r} must be an int{bounds}")
    return value


def check_float(name: str, value: object, *, positive: bool = False) -> float:
    """``value`` must be a finite real number (an int or float, not a bool), > 0 with ``positive``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be a finite number, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and not value > 0):
        raise ValueError(f"{name}={value!r} must be a finite number{' > 0' if positive else ''}")
    return float(value)


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be a bool, got {type(value).__name__}")
    return value


def check_recompute(value: object) -> tuple[bool, bool]:
    """``recompute_activations``: True / False for every expert, or ``"routed"`` / ``"shared"`` for those
    only -> (recompute the routed experts', recompute the shared experts')."""
    if isinstance(value, bool):
        return value, value
    expected = f"recompute_activations={value!r} must be a bool, 'routed' or 'shared'"
    if not isinstance(value, str):
        raise TypeError(f"{expected}, got {type(value).__name__}")
    if value not in ("routed", "shared"):
        raise ValueError(expected)
    return value == "routed", value == "shared"


@dataclass(frozen=True)
class RouterConfig:
    """How router logits become top-k expert choices. See docs/fused_moe.md for the formulas.

    Attributes:
        top_k: experts per token, ``1 <= top_k <= E``.
        score_func: ``"softmax"`` over all E logits, or ``"sigmoid"`` per logit.
        renormalize: divide the K selected scores by their sum (Mixtral, Qwen3-MoE, DeepSeek-V3);
            False keeps the raw scores (Qwen2-MoE, OLMoE).
        num_groups, topk_groups: group-limited routing (DeepSeek-V3): experts split into ``num_groups``
            contiguous groups; only experts of the ``topk_groups`` best groups can be selected.
        routed_scaling_factor: multiplies the final weights.
        capacity_factor: None = dropless; else each expert takes at most
            ``ceil(capacity_factor * T * K / E)`` slots, first come (token order, then k) first served.
    """

    top_k: int = 2
    score_func: str = "softmax"
    renormalize: bool = True
    num_groups: int | None = None
    topk_groups: int | None = None
    routed_scaling_factor: float = 1.0
    capacity_factor: float | None = None

    def to_op_arg(self) -> str:
        """The settings as one string: how they cross a ``torch.library`` op boundary whole (an
        f-string of the fields, which torch.compile traces; floats in ``repr``, which round-trips)."""
        return (
            f"{self.top_k};{self.score_func};{self.renormalize};{self.num_groups};{self.topk_groups};"
            f"{self.routed_scaling_factor!r};{self.capacity_factor!r}"
        )

    @staticmethod
    @lru_cache(maxsize=64)
    def from_op_arg(text: str) -> RouterConfig:
        """Inverse of :meth:`to_op_arg`."""
        top_k, score_func, renorm, groups, topk_groups, scale, capacity = text.split(";")
        maybe_int = lambda v: None if v == "None" else int(v)
        return RouterConfig(
            int(top_k),
            score_func,
            renorm == "True",
            maybe_int(groups),
            maybe_int(topk_groups),
            float(scale),
            None if capacity == "None" else float(capacity),
        )

    def __post_init__(self) -> None:
        """Type and range checks that need no E (``check`` adds those that do)."""
        check_int("top_k", self.top_k, 1)
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(
                f"score_func={self.score_func!r} is not supported; expected one of {SCORE_FUNCS}"
            )
        check_bool("renormalize", self.renormalize)
        if (self.num_groups is None) != (self.topk_groups is None):
            raise ValueError("num_groups and topk_groups must be given together (or neither)")
        if self.num_groups is not None:
            check_int("num_groups", self.num_groups, 1)
            check_int("topk_groups", self.topk_groups, 1, self.num_groups, "num_groups")
        check_float("routed_scaling_factor", self.routed_scaling_factor)
        if self.capacity_factor is not None:
            check_float("capacity_factor", self.capacity_factor, positive=True)

    def check(self, num_experts: int) -> None:
        """Raise ValueError naming the first setting that does not fit ``num_experts``."""
        E = check_int("num_experts", num_experts, 1)
        check_int("top_k", self.top_k, 1, E, "num_experts")
        if self.num_groups is not None:
            G = self.num_groups
            if E % G:
                raise ValueError(f"num_groups={G!r} must be a positive divisor of num_experts={E}")
            if self.top_k > self.topk_groups * (E // G):
                raise ValueError(
                    f"top_k={self.top_k} exceeds the experts in topk_groups={self.topk_groups} groups "
                    f"of {E // G}"
                )


def check_first_order(where: str) -> None:
    """Call first in the backward of an autograd.Function whose backward is not itself differentiable
    (fused kernels, collectives): under ``create_graph=True`` (double backward, a gradient penalty) it
    raises instead of returning gradients whose own gradients would silently be wrong."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{where} is differentiable once: backward(create_graph=True) (double backward, e.g. a "
            "gradient penalty through the MoE layer) is not supported here; the single-device torch "
            "backend (backend='torch') supports it"
        )


def _shape_error(name: str, t: torch.Tensor, expected: str) -> ValueError:
    return ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")


def check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    """Every tensor of a call lives on the tokens' device (``nn.Linear`` would raise too)."""
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, hidden_states on {device}: both must be on one device")


def check_hidden(x_TD: torch.Tensor, name: str = "hidden_states") -> None:
    """``x_TD``: a floating tensor ``[T, D]`` (T may be 0)."""
    if not isinstance(x_TD, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x_TD).__name__}")
    if x_TD.dim() != 2:
        raise _shape_error(name, x_TD, "[T, D]")
    if x_TD.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be one of {FLOAT_DTYPES}, got {x_TD.dtype}")


def check_expert_weights(
    w_up_eFD: torch.Tensor,
    w_down_eDI: torch.Tensor,
    D: int,
    x_TD: torch.Tensor,
    activation: str,
    names: tuple[str, str] = ("w_up", "w_down"),
) -> tuple[int, int]:
    """Check the HF-v5 expert layout for experts of width ``D``; return ``(e, I)``.

    ``w_up [e, F, D]`` with ``F = 2I`` for GLU activations (gate rows first) or ``F = I``;
    ``w_down [e, D, I]``; both of the tokens ``x_TD``'s dtype and on its device.
    """
    glu = is_glu(activation)
    up, down = names
    for name, w in ((up, w_up_eFD), (down, w_down_eDI)):
        if not isinstance(w, torch.Tensor) or w.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor, got {getattr(w, 'shape', type(w).__name__)}")
        if w.dtype != x_TD.dtype:
            raise TypeError(f"{name} dtype {w.dtype} must match hidden_states dtype {x_TD.dtype}")
        check_device(name, w, x_TD.device)
    e, F_, D_up = w_up_eFD.shape
    if D_up != D:
        raise _shape_error(up, w_up_eFD, f"[E, {'2I' if glu else 'I'}, D={D}]")
    if glu and F_ % 2:
        raise ValueError(f"{up} has {F_} rows; activation={activation!r} needs an even count 2I (gate, up)")
    I = F_ // 2 if glu else F_
    if tuple(w_down_eDI.shape) != (e, D, I):
        raise _shape_error(down, w_down_eDI, f"[E={e}, D={D}, I={I}]")
    return e, I


def check_topk(topk_ids_TK: torch.Tensor, T: int, num_experts: int, name: str = "topk_ids") -> None:
    """``topk_ids_TK``: integer ``[T, K]``; entries in ``[0, E)`` or -1 for a dropped slot."""
    if not isinstance(topk_ids_TK, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(topk_ids_TK).__name__}")
    if topk_ids_TK.dim() != 2 or topk_ids_TK.shape[0] != T:
        raise _shape_error(name, topk_ids_TK, f"[T={T}, K]")
    if topk_ids_TK.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {topk_ids_TK.dtype}")


@dataclass(frozen=True)
class Routing:
    """What a backend's router returns for one batch of T tokens.

    Attributes:
        topk_weights_TK: fp32 combine weights (0 for dropped slots); differentiable w.r.t. the logits.
        topk_ids_TK: int64 expert per slot, slots of a token in descending selection score; -1 = dropped.
        tokens_per_expert_E: int64 slots kept per expert (after capacity dropping).
        load_balance_loss: unweighted Switch load-balance loss, fp32 scalar (0 when T = 0).
        z_loss: unweighted router z-loss, fp32 scalar (0 when T = 0).
        dropped_slots: int64 scalar, slots dropped by the capacity limit.
    """

    topk_weights_TK: torch.Tensor
    topk_ids_TK: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    load_balance_loss: torch.Tensor
    z_loss: torch.Tensor
    dropped_slots: torch.Tensor


def sort_slots_by_expert(topk_ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference slot order of the grouped GEMMs: kept slots in (expert, token, k) order.

    Returns ``slots_S`` (int64 flat slot ids ``t*K + k``; slots with an id outside ``[0, E)`` left out)
    and ``counts_E`` (kept slots per expert).
    """
    E = num_experts
    ids_N = topk_ids_TK.reshape(-1).long()
    key_N = torch.where((ids_N >= 0) & (ids_N < E), ids_N, E)  # slots of no expert here sort last
    order_N = torch.sort(key_N, stable=True).indices
    counts_E = torch.bincount(key_N, minlength=E + 1)[:E]
    return order_N[: int(counts_E.sum())], counts_E
