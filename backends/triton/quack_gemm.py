"""QuACK's grouped GEMMs for SwiGLU experts on Hopper (optional): the token-row gather inside the GEMMs'
loads, SwiGLU and its backward inside their epilogues.

QuACK (``pip install quack-kernels``: Tri Dao's CuTe-DSL GEMMs, the ones under SonicMoE) has grouped
(varlen) GEMMs that read A's rows through an index and ping-pong epilogues that overlap the next tile's
MMAs, which Triton 3.6 does not give us. With it, the experts' six GEMMs become:

- forward: ``h, a = swiglu(x[tok] @ w_up[e].T)`` (one kernel), ``y = a @ w_down[e].T``;
- backward: ``g_a = g[tok] @ w_down[e]`` with the activation backward in its epilogue (``dh`` weighted,
  ``w * a`` for ``dW_down``, the routing-weight gradient ``<a, g_a>``: one kernel, no gathered copy of
  ``g``); ``dW_down = g[tok].T @ (w a)`` and ``dW_up = dh.T @ x[tok]`` read token rows through the index;
  ``dx`` rows ``= dh @ w_up[e]``.

``h`` and ``dh`` keep their columns interleaved (gate j, up j: QuACK's gated layout); the weights and their
gradients keep ours (``[gate; up]``, through ``concat_layout``). Every kernel has one fixed configuration
(below; from our op-by-op sweep and SonicMoE's own autotuning of the same GEMMs, docs/kernels.md): no
autotuning, so a first call compiles ~7 kernels (~5 s each, cached on disk by QuACK for later processes).

Where the triton path keeps its own up projection and activation backward (intermediate sizes above
``MAX_I``, e.g. Mixtral-like), QuACK can still take its two weight-gradient GEMMs (``weight_grad``):
``dW_up = dh.T @ x[tok]`` reads token rows through the index (no gathered copy of x) and ``dW_down =
g_rows.T @ (w a)`` the triton path's gathered ``grad_out`` rows; ``dh`` is already in ``w_up``'s row
order there.

Chosen by ``FLASHFUSEMOE_GEMM`` (``plan``): ``auto`` (the default: where QuACK loads and runs and
measured faster: all six GEMMs for model dims up to ``MAX_D``, intermediate sizes up to ``MAX_I`` and
layers of at least ``MIN_FLOPS`` (``MIN_FLOPS_TRACED`` under torch.compile); the two weight gradients for
larger intermediate sizes), ``quack`` (all six, required: an error says why they cannot run),
``quack-wgrad`` (the weight gradients only, required) or ``triton`` (never).

Legend: T tokens (or received rows), K top-k, N rows in expert order, E experts, D model dim, I
intermediate dim, S = T*K slots, E1 = E + 1 group bounds (``[0, offs...]``); in the generic GEMMs R the
rows of a source read by row (tokens, or rows in expert order), P and Q the other two dims.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashfusemoe import _env
from flashfusemoe.backends.triton.launch import cdiv, fast_launch

__all__ = [
    "down",
    "down_backward",
    "measured_choice",
    "plan",
    "recompute_h",
    "rows_from_slots",
    "runs_here",
    "slots_from_rows",
    "up",
    "up_backward",
    "weight_grad",
]

# Where auto takes QuACK: where it measured faster (H100, docs/kernels.md; forward+backward ms eager /
# graphed, QuACK vs ours): fine-grained (D 2048, I 768) 8.50 / 7.63 vs 9.00 / 8.22, OLMoE-like (2048,
# 1024) 9.81 / 9.23 vs 10.55 / 9.97 (both with the configurations before SonicMoE's); SonicMoE's default
# shape (4096, 1024) op by op with the configurations below (integration/quack_sweep.py: the six GEMMs
# 32.8 vs 34.0 ms, activation backward 4.2 vs 5.2). At Mixtral-like I = 14336 all six are slower with
# every configuration tried (op by op, 27.4 vs 26.8 at best), but the two weight gradients are faster
# (dW_up 5.53 vs 6.13 with the gather of x, dW_down 2.56 vs 2.73; the layer with them on QuACK 28.78 /
# 27.55 vs 30.13 / 28.26, on the configurations before ``wgrad_rows``). Small layers are host-bound in eager
# mode, and QuACK's host path is the longer one: seed-like (2.1e11 forward FLOPs) 2.97 vs 2.54 eager,
# 1.29 vs 1.34 graphed. Traced by torch.compile (run from CUDA graphs, or with the host ahead of the GPU
# in a whole model) the host path costs little: the seed-1b LM step (18 seed-like layers, compiled, one
# CUDA graph) took 58.73 / 58.94 ms with all six on QuACK against 60.52 / 60.53 (H100, two calls, each
# comparison in one call; the six GEMMs' kernels 25.2 vs 27.1 ms a step).
MAX_D = 4096
MAX_I = 4096
MIN_FLOPS = 5e11  # the experts' forward GEMMs: 6 N D I (eager)
MIN_FLOPS_TRACED = 2e11  # the same under torch.compile: the smallest layer measured there (seed-like)
# What a layer runs (``plan``): all six GEMMs on QuACK, its weight gradients only, or none
ALL, WGRAD, NONE = "quack", "quack-wgrad", "triton"
MODES = ("auto", ALL, WGRAD, NONE)
DEFAULT_MODE = "auto"
_STATE: dict = {}  # "reason": why QuACK cannot be imported ("" if it can), "api": its functions


@torch.compiler.assume_constant_result  # called, not traced, under torch.compile: no import in a graph
def _unavailable(device_index: int) -> str:
    """Why QuACK cannot run on CUDA device ``device_index`` ("" when it can); imports it once."""
    if "api" not in _STATE and "reason" not in _STATE:
        _STATE["reason"] = _load()
    if _STATE["reason"]:
        return _STATE["reason"]
    if torch.cuda.get_device_capability(device_index)[0] != 9:
        return "QuACK's path here runs on Hopper GPUs (compute capability 9.x)"
    return ""


def _load() -> str:
    """Import QuACK and fix its kernel configurations; why it failed, or ""."""
    try:
        from quack.gemm_config import GemmConfig
        from quack.gemm_interface import gemm_dgated_tuned, gemm_gated_tuned, gemm_tuned
    except Exception as exc:  # noqa: BLE001 - a broken optional dependency must not break the backend
        return f"cannot import quack ({type(exc).__name__}: {exc}); pip install quack-kernels"

    def config(m, n, pingpong, cluster=(2, 1)):
        return GemmConfig(
            tile_m=m, tile_n=n, pingpong=pingpong, cluster_m=cluster[0], cluster_n=cluster[1],
            is_dynamic_persistent=False, device_capacity=9,
        )  # fmt: skip

    _STATE["api"] = dict(
        gemm=gemm_tuned.fn, gated=gemm_gated_tuned.fn, dgated=gemm_dgated_tuned.fn,
        # The GEMMs that read token rows through the index: per op, the configuration SonicMoE's own
        # autotuning timed within 3% of its fastest at the fine-grained and OLMoE-like shapes (H100):
        # cooperative 128 x 256 (up, activation backward, dW_down), 256 x 128 (dW_up). The plain
        # GEMMs (down, dx): cooperative 256 x 128 clustered 1 x 2 (its fastest or within 5% at the
        # fine-grained, OLMoE-like and SonicMoE-default shapes; against the 128 x 192 ping-pong before:
        # OLMoE dx 1.51 vs 1.62 ms, SonicMoE-default down 3.11 vs 3.76; H100).
        up=config(128, 256, False), dgated_cfg=config(128, 256, False), wgrad_down=config(128, 256, False),
        wgrad_up=config(256, 128, False), plain=config(256, 128, False, (1, 2)),
        # The triton path's two weight gradients (WGRAD, Mixtral-like I = 14336): cooperative 256 x 128,
        # SonicMoE's autotuned choice for both there (H100, same run: dW_up 5.56 vs 6.04 ms for the
        # ping-pong 128 x 192 first taken, dW_down 2.70 vs 2.80 for cooperative 256 x 192)
        wgrad_rows=config(256, 128, False),
    )  # fmt: skip
    return ""


def runs_here() -> bool:
    """Whether QuACK imports and runs on the current CUDA device (no shape or dtype considered)."""
    return torch.cuda.is_available() and _unavailable(torch.cuda.current_device()) == ""


def _why_not(x_TD, w_up, w_down, activation: str, num_rows: int, gemms: str) -> str | None:
    """Why QuACK cannot run ``gemms`` (ALL or WGRAD) of these experts, or None (static facts only:
    traceable)."""
    E, F, D = w_up.shape
    I = w_down.shape[2]
    if gemms == ALL and activation != "swiglu":
        return f"activation {activation!r}: QuACK's path runs swiglu only"
    if not (x_TD.is_cuda and x_TD.dtype == w_up.dtype == w_down.dtype == torch.bfloat16):
        return "needs bf16 CUDA tensors (hidden states and expert weights)"
    if D % 8 or I % 8 or F % 8:
        return f"needs D, I and w_up's rows multiples of 8 (16-byte rows), got D={D}, I={I}, {F} rows"
    if not (w_up.is_contiguous() and w_down.is_contiguous()):
        return "needs contiguous expert weights"
    if not num_rows or not x_TD.shape[0]:
        return "no rows"
    return _unavailable(x_TD.device.index) or None


def plan(x_TD, w_up, w_down, activation: str, num_rows: int) -> str:
    """Which of the experts' GEMMs run on QuACK: ALL, WGRAD or NONE, as ``FLASHFUSEMOE_GEMM`` says (see
    the module docstring)."""
    mode = _env.gemm_from_env() or DEFAULT_MODE
    if mode not in MODES:
        raise ValueError(f"FLASHFUSEMOE_GEMM={mode!r} is not one of {MODES}")
    if mode == NONE:
        return NONE
    if mode != "auto":
        reason = _why_not(x_TD, w_up, w_down, activation, num_rows, mode)
        if reason is not None:
            raise RuntimeError(
                f"FLASHFUSEMOE_GEMM={mode}, but QuACK's GEMMs cannot run these experts: {reason}"
            )
        return mode
    choice = measured_choice(num_rows, w_up.shape[2], w_down.shape[2], torch.compiler.is_compiling())
    if choice == NONE or _why_not(x_TD, w_up, w_down, activation, num_rows, choice) is not None:
        return NONE
    return choice


def measured_choice(num_rows: int, D: int, I: int, traced: bool = False) -> str:
    """What ``auto`` runs on QuACK for ``num_rows`` expert rows of model dim D, intermediate dim I, in
    eager mode or ``traced`` by torch.compile."""
    if 6 * num_rows * D * I < (MIN_FLOPS_TRACED if traced else MIN_FLOPS):
        return NONE
    if I > MAX_I:
        return WGRAD
    return ALL if D <= MAX_D else NONE


# --------------------------------------------------------------- routing weights between slots and rows

_BLOCK = 1024


@fast_launch
@triton.jit
def _rows_slots_kernel(
    src_ptr, row_slot_ptr, live_ptr, dst_ptr, N, TO_SLOTS: tl.constexpr, BLOCK: tl.constexpr
):
    """Live rows only (the slot ids of rows past them are unset). ``TO_SLOTS``: ``dst[row_slot[r]] =
    src[r]`` (rows' values to slot order); else ``dst[r] = src[row_slot[r]]``, 0 past the live rows."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = (rows < N) & (rows < tl.load(live_ptr))
    slot = tl.load(row_slot_ptr + rows, mask=live, other=0)
    if TO_SLOTS:
        tl.store(dst_ptr + slot, tl.load(src_ptr + rows, mask=live), mask=live)
    else:
        tl.store(dst_ptr + rows, tl.load(src_ptr + slot, mask=live, other=0.0), mask=rows < N)


def rows_from_slots(w_S: torch.Tensor, row_slot_N: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``[N]``: row r's value ``w[row_slot[r]]`` for the ``live`` (1-element int32 tensor) rows, 0 after."""
    N = row_slot_N.shape[0]
    out_N = w_S.new_empty(N)
    if N:
        _rows_slots_kernel[(cdiv(N, _BLOCK),)](w_S, row_slot_N, live, out_N, N, TO_SLOTS=False, BLOCK=_BLOCK)
    return out_N


def slots_from_rows(g_N: torch.Tensor, row_slot_N: torch.Tensor, live: torch.Tensor, S: int) -> torch.Tensor:
    """``[S]``: slot ``row_slot[r]`` gets ``g[r]`` for the live rows; slots with no row get 0."""
    N = row_slot_N.shape[0]
    out_S = g_N.new_zeros(S)
    if N:
        _rows_slots_kernel[(cdiv(N, _BLOCK),)](g_N, row_slot_N, live, out_S, N, TO_SLOTS=True, BLOCK=_BLOCK)
    return out_S


# ------------------------------------------------------------------------------------------ the GEMMs


def up(x_TD, w_up_EFD, bounds_E1, row_token_N) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h [N, 2I] interleaved, a = swiglu(h) [N, I])`` of row r = token ``row_token[r]``."""
    q = _STATE["api"]
    N, F = row_token_N.shape[0], w_up_EFD.shape[1]
    h_NF, a_NI = x_TD.new_empty((N, F)), x_TD.new_empty((N, F // 2))
    q["gated"](
        x_TD, w_up_EFD.transpose(1, 2), h_NF, a_NI, activation="swiglu", cu_seqlens_m=bounds_E1,
        A_idx=row_token_N, dynamic_scheduler=False, config=q["up"], concat_layout=("B",),
    )  # fmt: skip
    return h_NF, a_NI


def recompute_h(x_TD, w_up_EFD, bounds_E1, row_token_N) -> torch.Tensor:
    """``h`` as ``up`` computes it (same interleaved columns, same tiles), without the activation."""
    q = _STATE["api"]
    h_NF = x_TD.new_empty((row_token_N.shape[0], w_up_EFD.shape[1]))
    q["gemm"](
        x_TD, w_up_EFD.transpose(1, 2), h_NF, cu_seqlens_m=bounds_E1, A_idx=row_token_N,
        dynamic_scheduler=False, config=q["up"], concat_layout=("B",),
    )  # fmt: skip
    return h_NF


def _mm(a_NP, b_EPQ, bounds_E1, concat: tuple = ()) -> torch.Tensor:
    """``[N, Q]``: row group e of ``a`` times ``b[e]``."""
    q = _STATE["api"]
    c_NQ = a_NP.new_empty((a_NP.shape[0], b_EPQ.shape[2]))
    q["gemm"](
        a_NP, b_EPQ, c_NQ, cu_seqlens_m=bounds_E1, dynamic_scheduler=False,
        config=q["plain"], concat_layout=concat or None,
    )  # fmt: skip
    return c_NQ


def down(a_NI, w_down_EDI, bounds_E1) -> torch.Tensor:
    """``y [N, D]``: row group e of ``a`` times ``w_down[e].T``."""
    return _mm(a_NI, w_down_EDI.transpose(1, 2), bounds_E1)


def weight_grad(
    src_RP, b_NQ, w, bounds_E1, row_token_N: torch.Tensor | None, acc: torch.Tensor | None, config: str,
    transposed: bool = False, concat: tuple = (),
) -> torch.Tensor:  # fmt: skip
    """The gradient of ``w`` [E, P, Q] (``[E, Q, P]`` with ``transposed``): for row group e,
    ``src[rows].T @ b`` with ``rows`` = ``row_token`` (token rows read through the index) or, if None,
    ``src``'s own rows in expert order. Added into ``acc`` if given (then an empty tensor is returned: a
    custom op's output may not alias its input)."""
    q = _STATE["api"]
    out = acc if acc is not None else torch.empty_like(w)
    q["gemm"](
        src_RP.T, b_NQ, out.transpose(1, 2) if transposed else out, cu_seqlens_k=bounds_E1,
        A_idx=row_token_N, add_to_output=acc is not None, dynamic_scheduler=False, config=q[config],
        concat_layout=concat or None,
    )  # fmt: skip
    return out if acc is None else out.new_empty(0)


def down_backward(
    grad_out_TD, h_NF, w_down_EDI, weights_S, bounds_E1, row_slot_N, row_token_N, overwrite_h: bool,
    grad_w_down_acc: torch.Tensor | None, need_grad_w_down: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(grad_h [N, 2I] interleaved (times w), grad_w_S [S] fp32 slot order, grad_w_down)``, as
    ``activation_backward`` + the ``w_down`` gradient of the triton path: ``grad_h`` over ``h`` itself
    with ``overwrite_h``; ``grad_w_down`` added into ``grad_w_down_acc`` if given (then empty), empty
    without ``need_grad_w_down``."""
    q = _STATE["api"]
    N, I = h_NF.shape[0], h_NF.shape[1] // 2
    live = bounds_E1[-1:]
    w_rows_N = rows_from_slots(weights_S, row_slot_N, live)
    grad_h_NF = h_NF if overwrite_h else torch.empty_like(h_NF)
    wa_NI = h_NF.new_empty((N, I))
    grad_w_N = q["dgated"](
        grad_out_TD, w_down_EDI, h_NF, grad_h_NF, wa_NI, colvec_scale=w_rows_N, activation="swiglu",
        colvec_reduce=True, cu_seqlens_m=bounds_E1, A_idx=row_token_N, dynamic_scheduler=False,
        config=q["dgated_cfg"],
    )  # fmt: skip
    grad_w_S = slots_from_rows(grad_w_N, row_slot_N, live, weights_S.shape[0])
    grad_w_down = wa_NI.new_empty(0)
    if need_grad_w_down:
        grad_w_down = weight_grad(
            grad_out_TD, wa_NI, w_down_EDI, bounds_E1, row_token_N, grad_w_down_acc, "wgrad_down"
        )
    return grad_h_NF, grad_w_S, grad_w_down


def up_backward(
    grad_h_NF, x_TD, w_up_EFD, bounds_E1, row_token_N, grad_w_up_acc: torch.Tensor | None,
    need_grad_w_up: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(grad_x rows [N, D] in expert order, grad_w_up)`` from the interleaved ``grad_h``; the weight
    gradient as in ``down_backward``."""
    grad_w_up = grad_h_NF.new_empty(0)
    if need_grad_w_up:
        grad_w_up = weight_grad(
            x_TD, grad_h_NF, w_up_EFD, bounds_E1, row_token_N, grad_w_up_acc, "wgrad_up", True, ("out",)
        )
    return _mm(grad_h_NF, w_up_EFD, bounds_E1, ("B",)), grad_w_up
