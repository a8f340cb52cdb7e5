"""Hugging Face transformers (v5) experts through FlashFuseMoE's fused experts.

``register()`` adds ``"flashfusemoe"`` to ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``; then
``model.set_experts_implementation("flashfusemoe")`` (or ``from_pretrained(...,
experts_implementation="flashfusemoe")``) runs every decorated experts module through
:func:`experts_forward`, training included. The model keeps its own router; only the experts change.

Supported: the layout of Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE and DeepSeek-V3 (``gate_up_proj [E, 2I, H]``
gate rows first, ``down_proj [E, H, I]``, no biases, the default gate ``act_fn(gate) * up``) with SiLU
(-> ``swiglu``) or exact GELU (-> ``geglu``), and ungated experts (``up_proj [E, I, H]``) with ReLU, GELU,
SiLU or ReLU^2. Anything else (GPT-OSS's transposed interleaved gate/up with biases and clamped SwiGLU,
tanh-GELU, post-expert norms) is refused with an error naming what differs, never swapped silently.
HF's expert-parallel convention (ids >= num_experts, weight 0, for experts on other ranks) is masked.

transformers is imported by :func:`register` only; ``import flashfusemoe`` never imports it.

Legend: S tokens, K top-k, E experts, H hidden size, I expert intermediate size.
"""

from __future__ import annotations

import torch

from flashfusemoe.amp import autocast_operands
from flashfusemoe.backends import get_backend, preload, resolve_name

__all__ = ["NAME", "activation_of", "experts_forward", "register"]

NAME = "flashfusemoe"
INSTALL_HINT = "flashfusemoe.integrations.hf needs Hugging Face transformers >= 5: pip install transformers"

# HF activation class name -> ours (plain); GLU experts use the gated form of the same function.
_PLAIN = {"SiLUActivation": "silu", "SiLU": "silu", "GELUActivation": "gelu", "GELU": "gelu", "ReLU": "relu"}
_PLAIN["ReLUSquaredActivation"] = "relu2"
_GATED = {"silu": "swiglu", "gelu": "geglu"}
_BACKEND: dict[str, str] = {}  # the backend name chosen at register(), resolved once


def _import_moe():
    try:
        from transformers.integrations import moe
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    return moe


def activation_of(experts: torch.nn.Module) -> str:
    """Our activation name for an HF experts module, or a ValueError naming what is not supported."""
    moe = _import_moe()
    name = type(experts).__name__
    for flag, what in (
        ("has_bias", "expert biases"),
        ("is_transposed", "transposed expert weights"),
        ("has_post_expert_norm", "a post-expert norm"),
    ):
        if getattr(experts, flag, False):
            raise ValueError(
                f"{name}: {what} are not supported by experts_implementation={NAME!r} (GPT-OSS-style "
                "experts: transposed, interleaved gate/up, biases, clamped SwiGLU); use 'grouped_mm'"
            )
    if not getattr(experts, "is_concatenated", True):
        raise ValueError(f"{name}: separate gate/up projections are not supported by {NAME!r} (grouped_mm)")
    gated = getattr(experts, "has_gate", True)
    default_gate = getattr(moe, "_default_apply_gate", None)  # absent in transformers without the hook
    if gated and getattr(type(experts), "_apply_gate", default_gate) is not default_gate:
        raise ValueError(
            f"{name} overrides _apply_gate (a custom gate, e.g. GPT-OSS's clamped SwiGLU): not supported by "
            f"{NAME!r}; use 'grouped_mm'"
        )
    act = getattr(experts, "act_fn", None)
    kind = _PLAIN.get(type(act).__name__)
    if type(act).__name__ in ("GELUActivation", "GELU") and getattr(act, "approximate", "none") != "none":
        kind = None  # tanh GELU: not the exact GELU our kernels compute
    if kind is None or (gated and kind not in _GATED):
        supported = sorted(_GATED) if gated else sorted(set(_PLAIN.values()))
        raise ValueError(
            f"{name}.act_fn is {type(act).__name__}: {NAME!r} supports {supported} for "
            f"{'gated' if gated else 'ungated'} experts; use 'grouped_mm'"
        )
    return _GATED[kind] if gated else kind


def experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The HF experts interface: ``hidden_states [S, H]``, ``top_k_index [S, K]`` (ids >= E: experts on
    other ranks under HF's expert parallelism, skipped), ``top_k_weights [S, K]`` -> ``[S, H]``:
    ``sum_k w[s, k] * expert_{ids[s, k]}(x[s])``, in hidden_states' dtype (fp32 accumulation of the
    K rows; inside ``torch.autocast`` in its dtype, from operands cast to it). Differentiable in
    hidden_states, the weights and the expert parameters."""
    activation = activation_of(self)
    w_up = self.gate_up_proj if getattr(self, "has_gate", True) else self.up_proj
    E = w_up.shape[0]
    ids_SK = torch.where(top_k_index < E, top_k_index, -1)
    be = get_backend(_BACKEND.get(NAME, "auto"), hidden_states.device)
    S, K = ids_SK.shape
    # torch.autocast: the GEMMs in its dtype, as HF's grouped_mm experts (flashfusemoe/amp.py)
    (x_SH, w_up, w_down), amp = autocast_operands(hidden_states, w_up, self.down_proj)
    with amp:
        return be.experts(x_SH, ids_SK, top_k_weights.float(), w_up, w_down, activation, False, S * K)


def register(backend: str | None = None) -> None:
    """Register ``"flashfusemoe"`` in transformers' ``ALL_EXPERTS_FUNCTIONS``. ``backend``: our compute
    backend (``torch``, ``triton``), resolved now: the argument, else ``FLASHFUSEMOE_BACKEND``, else
    auto (triton on CUDA). Calling it again re-registers with the new backend."""
    moe = _import_moe()
    name = resolve_name(backend)
    preload(name)
    _BACKEND[NAME] = name
    moe.ALL_EXPERTS_FUNCTIONS.register(NAME, experts_forward)
