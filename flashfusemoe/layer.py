"""``MoELayer``: parameters of a Mixture-of-Experts block and its communicator; the computation is
:func:`fused_moe`.

Legend: B batch, T tokens, D model dim, E experts (global), e local experts, F rows of w_up
(2I for GLU activations), I expert intermediate dim, W EP world size.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flashfusemoe.backends import preload, resolve_name
from flashfusemoe.balancing import update_expert_bias
from flashfusemoe.comm import Communicator, get_communicator
from flashfusemoe.comm.loopback import LOOPBACK
from flashfusemoe.functional import fused_moe
from flashfusemoe.spec import RouterConfig, check_bool, check_float, check_int, check_recompute, is_glu

__all__ = ["MoELayer", "stack_shared_experts"]


def _router_config(top_k: int | None, router: RouterConfig | None) -> RouterConfig:
    if router is None:
        return RouterConfig(top_k=2 if top_k is None else top_k)
    if not isinstance(router, RouterConfig):
        raise TypeError(f"router must be a RouterConfig or None, got {type(router).__name__}")
    if top_k is not None and top_k != router.top_k:
        raise ValueError(f"top_k={top_k!r} disagrees with router.top_k={router.top_k!r}: give one of them")
    return router


def stack_shared_experts(
    w_ups: list[torch.Tensor], w_downs: list[torch.Tensor], activation: str = "swiglu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """S shared experts as the one wider MLP of ``MoELayer.shared_w_up`` / ``shared_w_down``.

    ``w_ups[s]`` is ``[F, D]`` (GLU: gate rows, then up rows, as HF v5's ``gate_up_proj``; with separate
    HF ``gate_proj`` / ``up_proj``, pass ``torch.cat([gate, up])``), ``w_downs[s]`` is ``[D, I]``.
    Returns ``shared_w_up [S*F, D]`` and ``shared_w_down [D, S*I]``: for GLU activations all S gates
    first, then all S ups (stacking the w_ups as they are would pair expert 0's up rows with expert 1's
    gate rows), and the w_downs side by side in the same expert order. Their MLP equals the sum of
    the S experts' MLPs."""
    if not w_ups or len(w_ups) != len(w_downs):
        raise ValueError(
            f"w_ups and w_downs must be non-empty lists of one length, got {len(w_ups)}, {len(w_downs)}"
        )
    for s, (up, down) in enumerate(zip(w_ups, w_downs, strict=True)):
        if (
            not isinstance(up, torch.Tensor)
            or not isinstance(down, torch.Tensor)
            or up.dim() != 2
            or down.dim() != 2
        ):
            raise ValueError(f"shared expert {s}: w_up must be [F, D] and w_down [D, I] tensors")
        if up.shape[1] != down.shape[0] or up.shape[0] != (2 if is_glu(activation) else 1) * down.shape[1]:
            raise ValueError(
                f"shared expert {s}: w_up {tuple(up.shape)} and w_down {tuple(down.shape)} do not form an "
                f"{activation!r} MLP (w_up [{'2I' if is_glu(activation) else 'I'}, D], w_down [D, I])"
            )
    if is_glu(activation):
        gates, ups = zip(*(up.chunk(2, dim=0) for up in w_ups), strict=True)
        w_up = torch.cat([*gates, *ups])
    else:
        w_up = torch.cat(list(w_ups))
    return w_up, torch.cat(list(w_downs), dim=1)


class MoELayer(nn.Module):
    """Router + E experts (+ shared experts) in the Hugging Face transformers v5 weight layout.

    Args:
        d_model: D.
        ffn_dim: rows of each expert's ``w_up`` (``F``): ``2I`` for GLU activations, ``I`` otherwise.
        num_experts: E.
        top_k: experts per token (default 2); shorthand for ``router=RouterConfig(top_k=...)``.
        activation: ``swiglu`` | ``geglu`` | ``relu`` | ``gelu`` | ``silu`` | ``relu2``.
        num_shared_experts: always-active experts of the same shape, fused into one MLP of
            ``num_shared_experts`` times the width.
        router: the routing settings (:class:`flashfusemoe.RouterConfig`: score function,
            renormalization, groups, scaling, capacity), passed to :func:`fused_moe` whole.
        latent_dim: L < d_model: the routed experts work in a latent space of width L (Megatron's
            ``moe_latent_size``): tokens are projected down (``latent_down [L, D]``) after routing and
            back up (``latent_up [D, L]``) after combine, both replicated; dispatch moves L values a
            row instead of D. None: the experts work on the full D.
        use_expert_bias: keep a DeepSeek-V3 selection bias buffer, updated by :meth:`update_expert_bias`.
        aux_loss_group: count the load-balance loss's routed slots over this group's ranks (Qwen's
            global-batch balance; :func:`fused_moe`); an attribute, settable once the group exists.
        seq_aux_loss_coeff: DeepSeek-V3's sequence-wise balance loss (``losses["seq_aux_loss"]``): over
            each sequence of ``x [..., S, D]`` (batch first: the rows of its second-to-last dim; a
            ``[T, D]`` input is one sequence).
        Other keywords: the other loss coefficients, ``recompute_activations``, ``overlap`` and ``backend`` of
        :func:`fused_moe`. ``backend`` is resolved here, once: the argument, else
        ``FLASHFUSEMOE_BACKEND``, else ``"auto"``; an unknown or unloadable name raises here.

    Parameters: ``gate_weight [E, D]``, ``w_up [e, F, D]``, ``w_down [e, D, I]`` (D replaced by L
    with ``latent_dim``, plus ``latent_down [L, D]``, ``latent_up [D, L]``) and, with shared
    experts, ``shared_w_up [S*F, D]``, ``shared_w_down [D, S*I]``. ``forward(x [..., D])`` returns
    ``(out [..., D], losses)``. The layer runs through ``self.communicator``: ``loopback`` (e = E)
    until :meth:`shard_experts`.
    """

    def __init__(
        self,
        d_model: int,
        ffn_dim: int,
        num_experts: int,
        top_k: int | None = None,
        activation: str = "swiglu",
        num_shared_experts: int = 0,
        *,
        router: RouterConfig | None = None,
        latent_dim: int | None = None,
        use_expert_bias: bool = False,
        aux_loss_coeff: float = 0.0,
        aux_loss_group: object | None = None,
        z_loss_coeff: float = 0.0,
        seq_aux_loss_coeff: float = 0.0,
        recompute_activations: bool | str = False,
        overlap: bool = True,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("ffn_dim", ffn_dim), ("num_experts", num_experts)):
            check_int(name, value, 1)
        if is_glu(activation) and ffn_dim % 2:
            raise ValueError(f"ffn_dim={ffn_dim} must be even (2I: gate and up rows) for {activation!r}")
        check_int("num_shared_experts", num_shared_experts, 0)
        self.router_config = _router_config(top_k, router)
        self.router_config.check(num_experts)
        self.d_model, self.ffn_dim, self.num_experts = d_model, ffn_dim, num_experts
        self.activation = activation
        self.intermediate = ffn_dim // 2 if is_glu(activation) else ffn_dim
        self.aux_loss_coeff = check_float("aux_loss_coeff", aux_loss_coeff)
        self.aux_loss_group = aux_loss_group  # checked by fused_moe (a group may come after the layer)
        self.z_loss_coeff = check_float("z_loss_coeff", z_loss_coeff)
        self.seq_aux_loss_coeff = check_float("seq_aux_loss_coeff", seq_aux_loss_coeff)
        check_recompute(recompute_activations)
        self.recompute_activations = recompute_activations
        self.overlap = check_bool("overlap", overlap)
        check_bool("use_expert_bias", use_expert_bias)
        if latent_dim is not None:
            check_int("latent_dim", latent_dim, 1, d_model - 1, "d_model - 1")
        self.latent_dim = latent_dim
        L = d_model if latent_dim is None else latent_dim  # the experts' width
        self.backend = backend
        self.communicator: Communicator = LOOPBACK
        self._sharded = False
        factory = {"device": device, "dtype": dtype}
        self.gate_weight = nn.Parameter(torch.empty(num_experts, d_model, **factory))
        self.w_up = nn.Parameter(torch.empty(num_experts, ffn_dim, L, **factory))
        self.w_down = nn.Parameter(torch.empty(num_experts, L, self.intermediate, **factory))
        if latent_dim is not None:
            self.latent_down = nn.Parameter(torch.empty(latent_dim, d_model, **factory))
            self.latent_up = nn.Parameter(torch.empty(d_model, latent_dim, **factory))
        else:
            self.latent_down = self.latent_up = None
        if num_shared_experts:
            S = num_shared_experts
            self.shared_w_up = nn.Parameter(torch.empty(S * ffn_dim, d_model, **factory))
            self.shared_w_down = nn.Parameter(torch.empty(d_model, S * self.intermediate, **factory))
        else:
            self.shared_w_up = self.shared_w_down = None
        bias = torch.zeros(num_experts, device=device, dtype=torch.float32) if use_expert_bias else None
        self.register_buffer("expert_bias", bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal init, std ``1/sqrt(fan_in)`` for every projection."""
        with torch.no_grad():
            for w, fan_in in (
                (self.gate_weight, self.d_model),
                (self.w_up, self.w_up.shape[2]),
                (self.w_down, self.intermediate),
                (self.latent_down, self.d_model),
                (self.latent_up, self.latent_dim),
                (self.shared_w_up, self.d_model),
                (self.shared_w_down, self.shared_w_down.shape[1] if self.shared_w_down is not None else 1),
            ):
                if w is not None:
                    w.normal_(0.0, 1.0 / math.sqrt(fan_in))
            if self.expert_bias is not None:
                self.expert_bias.zero_()

    def expert_parameters(self) -> list[nn.Parameter]:
        """``[w_up, w_down]``: the parameters sharded over the EP group (each rank holds its own
        experts), never all-reduced across it. Every other parameter is replicated (dense)."""
        return [self.w_up, self.w_down]

    def shard_experts(
        self, ep_group: object | None, communicator: str | Communicator | None = None
    ) -> MoELayer:
        """Keep experts ``[rank*E/W, (rank+1)*E/W)`` of this rank and run expert-parallel over
        ``ep_group`` (a torch.distributed group, a ``FakeGroup``, or None for the default group).

        ``communicator``: a name, a Communicator spanning the group, or None (``FLASHFUSEMOE_COMM``,
        then auto). The expert Parameters stay the same objects (shrunk in place, ``requires_grad``
        and any ``.grad`` sliced along), so an optimizer built before still holds them: call this
        before the optimizer's first step (its state would have the unsharded shape). The router and
        shared experts stay replicated: their gradients are this rank's share, to be all-reduced like
        any dense weight."""
        if self._sharded:
            raise RuntimeError("shard_experts was already called on this layer")
        comm = get_communicator(communicator, ep_group)
        W, E = comm.world_size, self.num_experts
        if E % W:
            raise ValueError(f"num_experts={E} is not divisible by the EP world size {W}")
        local = comm.local_experts(E)
        with torch.no_grad():
            for p in self.expert_parameters():
                grad, p.grad = p.grad, None
                p.data = p.data[local.start : local.stop].clone()
                if grad is not None:
                    p.grad = grad[local.start : local.stop].clone()
        self.communicator, self._sharded = comm, True
        return self

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert_E: torch.Tensor, rate: float = 1e-3) -> None:
        """Apply :func:`flashfusemoe.update_expert_bias` to this layer's bias buffer."""
        if self.expert_bias is None:
            raise RuntimeError("this layer was built with use_expert_bias=False")
        if not isinstance(tokens_per_expert_E, torch.Tensor):
            raise TypeError(
                f"tokens_per_expert must be a tensor [E], got {type(tokens_per_expert_E).__name__}"
            )
        self.expert_bias.copy_(
            update_expert_bias(self.expert_bias, tokens_per_expert_E.to(self.expert_bias.device), rate)
        )

    @property
    def backend(self) -> str:
        """The backend name this layer runs (``"auto"``: chosen per call by the input's device)."""
        return self._backend

    @backend.setter
    def backend(self, backend: str | None) -> None:
        # Resolved when set, not per call (FLASHFUSEMOE_BACKEND is read here, once) and imported now: no
        # import or environment read inside a compiled forward, and a torch layer never imports Triton.
        name = resolve_name(backend)
        preload(name)
        self._backend = name

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape [..., D={self.d_model}], got {tuple(x.shape)}")
        out_TD, losses = fused_moe(
            x.reshape(-1, self.d_model),
            self.gate_weight,
            self.w_up,
            self.w_down,
            self.router_config,
            activation=self.activation,
            expert_bias=self.expert_bias,
            aux_loss_coeff=self.aux_loss_coeff,
            aux_loss_group=self.aux_loss_group,
            z_loss_coeff=self.z_loss_coeff,
            seq_aux_loss_coeff=self.seq_aux_loss_coeff,
            seq_len=x.shape[-2] if x.dim() >= 3 else None,
            shared_w_up=self.shared_w_up,
            shared_w_down=self.shared_w_down,
            latent_down=self.latent_down,
            latent_up=self.latent_up,
            recompute_activations=self.recompute_activations,
            backend=self.backend,
            communicator=self.communicator,
            overlap=self.overlap,
        )
        return out_TD.view(x.shape), losses

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, ffn_dim={self.ffn_dim}, num_experts={self.num_experts}, "
            f"activation={self.activation!r}, router={self.router_config}, "
            f"ep_world_size={self.communicator.world_size}"
        )
