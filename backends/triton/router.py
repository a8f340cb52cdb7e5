"""Fused router epilogue after the fp32 gate GEMM. Forward: one kernel (scores, bias, group limit,
top-k, renormalization, per-block loss statistics) and one single-program kernel that reduces the
statistics in a fixed order into the slots per expert and the two loss scalars. Backward: one kernel (the
logits' gradient from the weights, the load-balance loss and the z-loss).

Legend: T tokens, E experts, K top-k, G expert groups, B forward programs (SUB token blocks of BLOCK_T
each).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashfusemoe.backends.triton.launch import cdiv, fast_launch, next_pow2
from flashfusemoe.spec import RouterConfig

__all__ = ["router_backward", "router_forward"]

BLOCK_T = 16
# Forward programs aimed at: each routes SUB = cdiv(T, BLOCK_T * ROUTER_PROGRAMS) blocks. Enough to fill
# the GPU, few enough rows for the single-program stats reduction (H200, T = 16384, E = 128: forward +
# stats 116 us with one block per program, 49 us with 256 programs).
ROUTER_PROGRAMS = 256


@triton.jit
def _scores(x, col_ok, SIGMOID: tl.constexpr):
    """fp32 logits tile -> (scores, softmax, logsumexp, has_nan) with masked columns at 0."""
    m = tl.max(x, axis=1)
    ex = tl.where(col_ok[None, :], tl.exp(x - m[:, None]), 0.0)
    ssum = tl.sum(ex, axis=1)
    soft = ex / ssum[:, None]
    lse = m + tl.log(ssum)
    if SIGMOID:
        s = tl.where(col_ok[None, :], tl.sigmoid(x), 0.0)
    else:
        s = soft
    has_nan = tl.max(tl.where(x != x, 1, 0), axis=1) > 0
    return s, soft, lse, has_nan


@triton.jit
def _order_key(x):
    """fp32 -> int32 whose signed order is the float order (an involution: applied to a key it gives
    the float's bits back)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@fast_launch
@triton.jit
def _router_fwd_kernel(
    logits_ptr,
    bias_ptr,
    ids_ptr,
    w_ptr,
    psum_ptr,
    cnt_ptr,
    zsum_ptr,
    T,
    SUB,
    scale,
    E: tl.constexpr,
    K: tl.constexpr,
    SIGMOID: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RENORM: tl.constexpr,
    G: tl.constexpr,
    TOPK_G: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """One program routes SUB blocks of BLOCK_T tokens in order and writes one row of per-block sums
    (fewer rows for the stats kernel to reduce)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    kcols = tl.arange(0, BLOCK_K)
    kmask_k = kcols[None, :] < K
    psum = tl.zeros((BLOCK_E,), dtype=tl.float32)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    zsum = tl.zeros((BLOCK_T,), dtype=tl.float32)
    # (key of the selection score) << 32 | reversed column: one max both picks the best score and breaks
    # its ties to the lowest id
    low = (BLOCK_E - 1 - cols).to(tl.int64)[None, :]
    for j in range(SUB):
        toks = (pid * SUB + j) * BLOCK_T + tl.arange(0, BLOCK_T)
        tok_ok = toks < T
        x = tl.load(
            logits_ptr + toks[:, None].to(tl.int64) * E + cols[None, :],
            mask=tok_ok[:, None] & col_ok[None, :],
            other=float("-inf"),
        )
        s, soft, lse, has_nan = _scores(x, col_ok, SIGMOID)
        sel = s
        if HAS_BIAS:
            sel = sel + tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
        # Selection policy (docs/fused_moe.md): a NaN selection score counts as -inf; top-k in descending
        # score, ties to the lowest id, each expert (group) at most once: a taken mask, not a -inf
        # overwrite, which ties with scores that are -inf already. + 0.0 makes -0.0 tie with 0.0.
        sel = tl.where(col_ok[None, :] & (sel == sel), sel, float("-inf")) + 0.0
        free = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1) | col_ok[None, :]  # experts still selectable
        if G > 0:  # group-limited routing: a group scores the sum of its top-2 (top-1) selection scores
            GS: tl.constexpr = E // G
            gcols = tl.arange(0, BLOCK_G)
            gscore = tl.full((BLOCK_T, BLOCK_G), float("-inf"), tl.float32)
            for g in tl.static_range(G):
                in_g = (cols // GS == g)[None, :]
                m1 = tl.max(tl.where(in_g, sel, float("-inf")), axis=1)
                total = m1
                if GS > 1:
                    i1 = tl.min(tl.where(in_g & (sel == m1[:, None]), cols[None, :], BLOCK_E), axis=1)
                    total += tl.max(
                        tl.where(in_g & (cols[None, :] != i1[:, None]), sel, float("-inf")), axis=1
                    )
                total = tl.where(total == total, total, float("-inf"))  # +inf + -inf
                gscore = tl.where(gcols[None, :] == g, total[:, None], gscore)
            allowed = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)  # experts of the chosen groups only
            gfree = tl.zeros((BLOCK_T, BLOCK_G), dtype=tl.int1) | (gcols < G)[None, :]
            for _ in tl.static_range(TOPK_G):
                gm = tl.max(tl.where(gfree, gscore, float("-inf")), axis=1)
                gi = tl.min(tl.where(gfree & (gscore == gm[:, None]), gcols[None, :], BLOCK_G), axis=1)
                allowed = allowed | ((cols[None, :] // GS) == gi[:, None])
                gfree = gfree & (gcols[None, :] != gi[:, None])
            free = free & allowed
        selectable = free
        key = (_order_key(sel).to(tl.int64) << 32) | low
        ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
        wts = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
        for k in tl.static_range(K):
            # below every real key (that of -inf included): a taken expert never wins
            best = tl.max(tl.where(free, key, -0x7FFFFFFFFFFFFFFF), axis=1)
            idx = (BLOCK_E - 1 - (best & 0xFFFFFFFF)).to(tl.int32)
            hit = cols[None, :] == idx[:, None]
            if HAS_BIAS:
                wk = tl.sum(tl.where(hit, s, 0.0), axis=1)
            else:  # the key holds the score itself
                wk = _order_key((best >> 32).to(tl.int32)).to(tl.float32, bitcast=True)
            ids = tl.where(kcols[None, :] == k, idx[:, None], ids)
            wts = tl.where(kcols[None, :] == k, wk[:, None], wts)
            free = free & ~hit
        taken = selectable & ~free
        counts += tl.sum((taken & tok_ok[:, None]).to(tl.int32), axis=0)
        if RENORM:
            wts = wts / (tl.sum(wts, axis=1)[:, None] + 1e-20)
        wts = wts * scale
        wts = tl.where(has_nan[:, None], float("nan"), wts)
        kmask = tok_ok[:, None] & kmask_k
        tl.store(ids_ptr + toks[:, None] * K + kcols[None, :], ids, mask=kmask)
        tl.store(w_ptr + toks[:, None] * K + kcols[None, :], wts, mask=kmask)
        zsum += tl.where(tok_ok, lse * lse, 0.0)
        if SIGMOID:
            p = s / tl.sum(s, axis=1)[:, None]
        else:
            p = s
        psum += tl.sum(tl.where(tok_ok[:, None], p, 0.0), axis=0)
    tl.store(zsum_ptr + pid, tl.sum(zsum, axis=0))
    tl.store(psum_ptr + pid * E + cols, psum, mask=col_ok)
    tl.store(cnt_ptr + pid * E + cols, counts, mask=col_ok)


@fast_launch
@triton.jit
def _router_stats_kernel(
    psum_ptr,
    cnt_ptr,
    zsum_ptr,
    routed_ptr,
    lb_ptr,
    z_ptr,
    B,
    lb_scale,
    inv_T,
    E: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """One program: sums the B per-block rows in block order (deterministic), then
    ``lb = lb_scale * sum_e routed_e * prob_sum_e`` and ``z = inv_T * sum_t lse_t^2``."""
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    psum = tl.zeros((BLOCK_E,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_E,), dtype=tl.int32)
    zsum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        tile = bs[:, None] * E + cols[None, :]
        mask = (bs[:, None] < B) & col_ok[None, :]
        psum += tl.sum(tl.load(psum_ptr + tile, mask=mask, other=0.0), axis=0)
        cnt += tl.sum(tl.load(cnt_ptr + tile, mask=mask, other=0), axis=0)
        zsum += tl.load(zsum_ptr + bs, mask=bs < B, other=0.0)
    tl.store(routed_ptr + cols, cnt.to(tl.int64), mask=col_ok)
    tl.store(routed_ptr + E, 0)  # the dropped-slot count: no capacity limit here
    tl.store(lb_ptr, lb_scale * tl.sum(cnt.to(tl.float32) * psum, axis=0))
    tl.store(z_ptr, inv_T * tl.sum(zsum, axis=0))


def router_forward(logits_TE: torch.Tensor, cfg: RouterConfig, expert_bias_E: torch.Tensor | None):
    """Returns ``ids [T, K]`` int32, ``weights [T, K]`` fp32, ``routed [E + 1]`` int64 (slots per
    expert before capacity, then a 0: no slot dropped), and the unweighted load-balance loss and z-loss
    (fp32 scalars, 0 when T = 0)."""
    T, E = logits_TE.shape
    K = cfg.top_k
    dev = logits_TE.device
    SUB = max(1, cdiv(T, BLOCK_T * ROUTER_PROGRAMS))
    B = cdiv(T, BLOCK_T * SUB)
    ids = torch.empty((T, K), dtype=torch.int32, device=dev)
    wts = torch.empty((T, K), dtype=torch.float32, device=dev)
    psum = torch.empty((B, E), dtype=torch.float32, device=dev)
    cnt = torch.empty((B, E), dtype=torch.int32, device=dev)
    zsum = torch.empty((B,), dtype=torch.float32, device=dev)
    routed = torch.empty((E + 1,), dtype=torch.int64, device=dev)
    lb, z = torch.empty((), device=dev), torch.empty((), device=dev)
    G = cfg.num_groups or 0
    if T:
        bias = expert_bias_E.detach().float().contiguous() if expert_bias_E is not None else wts
        _router_fwd_kernel[(B,)](
            logits_TE,
            bias,
            ids,
            wts,
            psum,
            cnt,
            zsum,
            T,
            SUB,
            float(cfg.routed_scaling_factor),
            E=E,
            K=K,
            SIGMOID=cfg.score_func == "sigmoid",
            HAS_BIAS=expert_bias_E is not None,
            RENORM=cfg.renormalize,
            G=G,
            TOPK_G=cfg.topk_groups or 0,
            BLOCK_T=BLOCK_T,
            BLOCK_E=next_pow2(E),
            BLOCK_K=next_pow2(K),
            BLOCK_G=next_pow2(max(G, 1)),
        )
    _router_stats_kernel[(1,)](
        psum,
        cnt,
        zsum,
        routed,
        lb,
        z,
        B,
        _lb_scale(T, E, K),
        1.0 / T if T else 0.0,
        E=E,
        BLOCK_B=max(1, min(next_pow2(B), 8192 // next_pow2(E))),
        BLOCK_E=next_pow2(E),
        num_warps=8,
    )
    return ids, wts, routed, lb, z


def _lb_scale(T: int, E: int, K: int) -> float:
    """The Switch loss ``E * sum_e (routed_e / (T*K)) * (prob_sum_e / T)`` is this times
    ``sum_e routed_e * prob_sum_e``."""
    return E / (T * K * T) if T else 0.0


@fast_launch
@triton.jit
def _router_bwd_kernel(
    logits_ptr,
    ids_ptr,
    gw_ptr,
    routed_ptr,
    glb_ptr,
    gz_ptr,
    out_ptr,
    T,
    scale,
    lb_scale,
    inv_T,
    E: tl.constexpr,
    K: tl.constexpr,
    SIGMOID: tl.constexpr,
    RENORM: tl.constexpr,
    HAS_GW: tl.constexpr,
    HAS_LB: tl.constexpr,
    HAS_Z: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    tok_ok = toks < T
    col_ok = cols < E
    tile = toks[:, None].to(tl.int64) * E + cols[None, :]
    x = tl.load(logits_ptr + tile, mask=tok_ok[:, None] & col_ok[None, :], other=float("-inf"))
    s, soft, lse, _ = _scores(x, col_ok, SIGMOID)
    ds = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)  # gradient w.r.t. the scores s
    if HAS_GW:  # through the selected scores' renormalization and scaling
        ssel = tl.zeros((BLOCK_T,), dtype=tl.float32)
        dot = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for k in tl.static_range(K):
            idx = tl.load(ids_ptr + toks * K + k, mask=tok_ok, other=0)
            sk = tl.sum(tl.where(cols[None, :] == idx[:, None], s, 0.0), axis=1)
            gk = tl.load(gw_ptr + toks * K + k, mask=tok_ok, other=0.0)
            ssel += sk
            dot += gk * sk
        for k in tl.static_range(K):
            idx = tl.load(ids_ptr + toks * K + k, mask=tok_ok, other=0)
            gk = tl.load(gw_ptr + toks * K + k, mask=tok_ok, other=0.0)
            if RENORM:
                denom = ssel + 1e-20
                dk = scale * (gk - dot / denom) / denom
            else:
                dk = scale * gk
            ds += tl.where(cols[None, :] == idx[:, None], dk[:, None], 0.0)
    if HAS_LB:  # lb = lb_scale * sum_e routed_e * sum_t p[t, e]
        routed = tl.load(routed_ptr + cols, mask=col_ok, other=0).to(tl.float32)
        gp = (tl.load(glb_ptr) * lb_scale * routed)[None, :]
        if SIGMOID:  # p = s / sum(s)
            ssum = tl.sum(s, axis=1)[:, None]
            ds += (gp - tl.sum(gp * (s / ssum), axis=1)[:, None]) / ssum
        else:
            ds += gp
    if SIGMOID:
        dx = ds * s * (1.0 - s)
    else:
        dx = s * (ds - tl.sum(ds * s, axis=1)[:, None])
    if HAS_Z:  # z = inv_T * sum_t lse_t^2, through logsumexp
        dx += (tl.load(gz_ptr) * 2.0 * inv_T * lse)[:, None] * soft
    tl.store(out_ptr + tile, dx, mask=tok_ok[:, None] & col_ok[None, :])


def router_backward(
    logits_TE: torch.Tensor,
    ids_TK: torch.Tensor,
    routed_E: torch.Tensor,
    grad_w_TK: torch.Tensor | None,
    grad_lb: torch.Tensor | None,
    grad_z: torch.Tensor | None,
    cfg: RouterConfig,
) -> torch.Tensor:
    """Gradient w.r.t. the fp32 logits ``[T, E]`` from those of the weights ``[T, K]`` and of the two
    loss scalars (None: no gradient flows from that output); ``routed_E`` is the forward's slots per
    expert (its first E entries are read)."""
    T, E = logits_TE.shape
    out = torch.empty_like(logits_TE)
    if T:
        _router_bwd_kernel[(cdiv(T, BLOCK_T),)](
            logits_TE,
            ids_TK,
            grad_w_TK.contiguous() if grad_w_TK is not None else out,
            routed_E,
            grad_lb if grad_lb is not None else out,
            grad_z if grad_z is not None else out,
            out,
            T,
            float(cfg.routed_scaling_factor),
            _lb_scale(T, E, cfg.top_k),
            1.0 / T,
            E=E,
            K=cfg.top_k,
            SIGMOID=cfg.score_func == "sigmoid",
            RENORM=cfg.renormalize,
            HAS_GW=grad_w_TK is not None,
            HAS_LB=grad_lb is not None,
            HAS_Z=grad_z is not None,
            BLOCK_T=BLOCK_T,
            BLOCK_E=next_pow2(E),
        )
    return out
