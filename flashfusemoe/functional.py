"""``fused_moe``: the functional MoE layer: router -> dispatch -> experts -> combine (+ shared experts).

One compute path for every world size: the communicator (``loopback`` when none is given: zero-copy,
so this IS the single-GPU layer) delivers rows with their local expert ids and weights, the backend's
fused ``experts`` make one row per received row (the weighted sum over its local experts), and
``combine`` sums a token's rows over ranks.

Legend: T tokens (this rank), K top-k, E experts (global), e local experts (E under no EP),
D model dim, I expert intermediate dim, F rows of w_up (2I for GLU), R rows received after dispatch,
W EP world size.
"""

from __future__ import annotations

import torch

from flashfusemoe import overlap as _overlap
from flashfusemoe.amp import autocast_operands
from flashfusemoe.backends import get_backend
from flashfusemoe.backends.torch import router_logits
from flashfusemoe.comm import Communicator
from flashfusemoe.comm.loopback import LOOPBACK
from flashfusemoe.losses import RouterLosses
from flashfusemoe.spec import (
    RouterConfig,
    check_bool,
    check_device,
    check_expert_weights,
    check_hidden,
    check_recompute,
)

__all__ = ["fused_moe", "router_logits"]


def _check_router_args(x_TD, gate_weight_ED, expert_bias_E) -> int:
    D = x_TD.shape[1]
    if (
        not isinstance(gate_weight_ED, torch.Tensor)
        or gate_weight_ED.dim() != 2
        or gate_weight_ED.shape[1] != D
    ):
        raise ValueError(
            f"gate_weight must have shape [E, D={D}], got {getattr(gate_weight_ED, 'shape', None)}"
        )
    if not gate_weight_ED.is_floating_point():
        raise TypeError(f"gate_weight must be a floating tensor, got {gate_weight_ED.dtype}")
    check_device("gate_weight", gate_weight_ED, x_TD.device)
    E = gate_weight_ED.shape[0]
    if expert_bias_E is not None:
        if not isinstance(expert_bias_E, torch.Tensor) or tuple(expert_bias_E.shape) != (E,):
            raise ValueError(
                f"expert_bias must have shape [E={E}], got {getattr(expert_bias_E, 'shape', None)}"
            )
        if not expert_bias_E.is_floating_point():
            raise TypeError(f"expert_bias must be a floating tensor, got {expert_bias_E.dtype}")
        check_device("expert_bias", expert_bias_E, x_TD.device)
    return E


def _check_shared(shared_w_up, shared_w_down, x_TD, activation) -> None:
    if (shared_w_up is None) != (shared_w_down is None):
        raise ValueError("shared_w_up and shared_w_down must be given together (or neither)")
    if shared_w_up is not None:
        for name, w in (("shared_w_up", shared_w_up), ("shared_w_down", shared_w_down)):
            if not isinstance(w, torch.Tensor) or w.dim() != 2:
                raise ValueError(f"{name} must be a 2-D tensor, got {getattr(w, 'shape', type(w).__name__)}")
        check_expert_weights(
            shared_w_up[None],
            shared_w_down[None],
            x_TD.shape[1],
            x_TD,
            activation,
            ("shared_w_up", "shared_w_down"),
        )


def _check_latent(latent_down_LD, latent_up_DL, x_TD) -> None:
    if (latent_down_LD is None) != (latent_up_DL is None):
        raise ValueError("latent_down and latent_up must be given together (or neither)")
    if latent_down_LD is None:
        return
    D = x_TD.shape[1]
    for name, w, expected in (
        ("latent_down", latent_down_LD, "[L, D={D}]"),
        ("latent_up", latent_up_DL, "[D={D}, L]"),
    ):
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ValueError(
                f"{name} must be a 2-D tensor {expected.format(D=D)}, got {getattr(w, 'shape', None)}"
            )
        if w.dtype != x_TD.dtype:
            raise TypeError(f"{name} dtype {w.dtype} must match hidden_states dtype {x_TD.dtype}")
        check_device(name, w, x_TD.device)
    L = latent_down_LD.shape[0]
    if latent_down_LD.shape[1] != D or tuple(latent_up_DL.shape) != (D, L):
        raise ValueError(
            f"latent_down must be [L, D={D}] and latent_up [D={D}, L]: got {tuple(latent_down_LD.shape)} "
            f"and {tuple(latent_up_DL.shape)}"
        )


def fused_moe(
    hidden_states_TD: torch.Tensor,
    gate_weight_ED: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    router: RouterConfig | None = None,
    *,
    activation: str = "swiglu",
    expert_bias: torch.Tensor | None = None,
    aux_loss_coeff: float = 0.0,
    aux_loss_group: object | None = None,
    z_loss_coeff: float = 0.0,
    seq_aux_loss_coeff: float = 0.0,
    seq_len: int | None = None,
    shared_w_up: torch.Tensor | None = None,
    shared_w_down: torch.Tensor | None = None,
    latent_down: torch.Tensor | None = None,
    latent_up: torch.Tensor | None = None,
    recompute_activations: bool | str = False,
    backend: str | None = None,
    communicator: Communicator | None = None,
    overlap: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mixture-of-Experts forward for T tokens; differentiable in every tensor argument but the bias.

    Args:
        hidden_states_TD: ``[T, D]`` fp32/bf16/fp16 (T may be 0). Inside ``torch.autocast`` of its
            device type, it and every weight but the bias are cast to the autocast dtype, as
            ``nn.Linear``'s operands are (``flashfusemoe/amp.py``).
        gate_weight_ED: router weight ``[E, D]`` (any float dtype; the router runs in fp32).
        w_up: ``[e, F, D]`` in hidden_states' dtype; GLU activations: ``F = 2I``, gate rows first.
        w_down: ``[e, D, I]``. ``e = E / W``: this rank's contiguous block of experts (all E at W = 1).
        router: the top-k routing settings (:class:`flashfusemoe.RouterConfig`), passed whole; None:
            ``RouterConfig()`` (softmax top-2).
        expert_bias: fp32 ``[E]`` added to the scores for selection only (aux-loss-free balancing).
        aux_loss_group: a torch.distributed group (or ``FakeGroup``) whose ranks' routed slots the
            load-balance loss counts together (Qwen's global-batch balance): ``f_e`` from the
            group's whole batch, ``P_e`` from this rank's tokens; averaged over the group's ranks (as
            data-parallel gradients are) it is the load-balance loss of the group's batch. A
            collective on every call with ``aux_loss_coeff`` not 0: every rank of the group calls.
            Needs dropless routing. None: this call's tokens alone.
        seq_aux_loss_coeff, seq_len: DeepSeek-V3's sequence-wise balance loss, over the ``T / seq_len``
            sequences of ``seq_len`` consecutive tokens (None: the T tokens are one sequence); needs
            dropless routing (``router.capacity_factor`` None).
        shared_w_up, shared_w_down: ``[F_s, D]`` / ``[D, I_s]`` always-active expert, same activation.
        latent_down, latent_up: ``[L, D]`` / ``[D, L]``: the routed experts work in a latent space of
            width L (Megatron's ``moe_latent_size``): tokens are projected down after routing (the
            router and shared experts see the full D) and back up after combine, so dispatch moves
            L values per row; ``w_up`` / ``w_down`` are then ``[e, F, L]`` / ``[e, L, I]``.
        recompute_activations: True: keep no expert activations (routed or shared) for backward;
            recompute them there. Needed to backpropagate twice through one graph on the ``triton``
            backend (docs/moe_layer.md). ``"routed"`` / ``"shared"``: only those experts'.
        backend: compute backend name (``torch``, ``triton``); None: ``FLASHFUSEMOE_BACKEND``, then auto.
        communicator: moves tokens to their experts' ranks (:mod:`flashfusemoe.comm`); None: loopback.
        overlap: with shared experts and a communicator of W > 1 ranks, run the shared experts (and
            their backward) while the dispatch all-to-all (and its backward) is in flight, on two CUDA
            streams (:mod:`flashfusemoe.overlap`); the results are bit-identical to ``overlap=False``.

    Returns:
        ``out_TD`` in hidden_states' dtype, and a dict with ``aux_loss`` (``aux_loss_coeff`` times the
        load-balance loss), ``z_loss`` (``z_loss_coeff`` times the z-loss) and ``seq_aux_loss``
        (``seq_aux_loss_coeff`` times the sequence-wise balance loss), fp32 scalars that backprop,
        plus detached telemetry ``tokens_per_expert`` ``[E]`` and ``dropped_slots``.
    """
    # torch.autocast: the GEMMs in its dtype, as nn.Linear's (flashfusemoe/amp.py)
    operands, amp = autocast_operands(
        hidden_states_TD, gate_weight_ED, w_up, w_down, shared_w_up, shared_w_down, latent_down, latent_up
    )
    x_TD, gate_weight_ED, w_up, w_down, shared_w_up, shared_w_down, latent_down, latent_up = operands
    with amp:
        check_hidden(x_TD)
        E = _check_router_args(x_TD, gate_weight_ED, expert_bias)
        router = RouterConfig() if router is None else router
        if not isinstance(router, RouterConfig):
            raise TypeError(f"router must be a RouterConfig, got {type(router).__name__}")
        router.check(E)
        _check_latent(latent_down, latent_up, x_TD)
        L = x_TD.shape[1] if latent_down is None else latent_down.shape[0]  # the experts' width
        e, _ = check_expert_weights(w_up, w_down, L, x_TD, activation)
        comm = LOOPBACK if communicator is None else communicator
        if not isinstance(comm, Communicator):
            raise TypeError(f"communicator must be a Communicator or None, got {type(comm).__name__}")
        W = comm.world_size
        if e * W != E:
            raise ValueError(
                f"w_up holds {e} experts; expected num_experts / EP world size = {E} / {W} = {E / W:g}"
            )
        _check_shared(shared_w_up, shared_w_down, x_TD, activation)
        loss_settings = RouterLosses(
            aux_loss_coeff, aux_loss_group, z_loss_coeff, seq_aux_loss_coeff, seq_len
        )
        loss_settings.check(x_TD.shape[0], router)
        recompute_routed, recompute_shared = check_recompute(recompute_activations)
        check_bool("overlap", overlap)
        be = get_backend(backend, x_TD.device)

        def shared_mlp() -> torch.Tensor:
            return be.expert_mlp(x_TD, shared_w_up, shared_w_down, activation, recompute_shared)

        logits_TE = be.router_logits(x_TD, gate_weight_ED)
        routing = be.route(logits_TE, router, expert_bias)
        losses = loss_settings(logits_TE, routing, router)
        h_TL = x_TD if latent_down is None else x_TD @ latent_down.t()
        overlapped = _overlap.applies(comm, shared_w_up is not None, overlap)
        after = _overlap.begin(h_TL) if overlapped else None
        shared_TD = shared_mlp() if overlapped else None  # launched before the dispatch it overlaps
        recv = _overlap.dispatch(
            comm, after, h_TL, routing.topk_ids_TK, routing.topk_weights_TK, num_experts=E
        )
        y_RD = be.experts(
            recv.recv_x_RD,
            recv.recv_topk_ids_RK,
            recv.recv_topk_weights_RK,
            w_up,
            w_down,
            activation,
            recompute_routed,
            recv.num_recv_slots,
        )
        out_TD = comm.combine(y_RD, recv.handle)
        if latent_up is not None:
            out_TD = out_TD @ latent_up.t()
        if shared_w_up is not None:
            out_TD = out_TD + (shared_TD if overlapped else shared_mlp())
        return out_TD, losses
