"""Every Triton kernel against the torch reference, fp32, small and odd shapes.

On CPU these run under the Triton interpreter (conftest sets TRITON_INTERPRET=1); with a GPU they run
on it. Edge cases: empty experts, K = E, T = 1, T = 0, odd D and I, dropped slots.
"""

import copy
import dataclasses
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flashfusemoe import MoELayer
from flashfusemoe.backends import get_backend
from flashfusemoe.backends import torch as ref
from flashfusemoe.backends.triton import experts as tri_experts
from flashfusemoe.backends.triton import grouped_gemm, tma_gemm
from flashfusemoe.backends.triton import route as tri_route
from flashfusemoe.backends.triton.activation import activation_backward, activation_forward
from flashfusemoe.backends.triton.grouped_gemm import grouped_mm, grouped_mm_act, grouped_mm_wgrad
from flashfusemoe.backends.triton.metadata import routing_metadata
from flashfusemoe.backends.triton.permute import combine_rows, gather_rows
from flashfusemoe.backends.triton.tma_gemm import glu_halves_ok, tma_layout_ok, tma_ok
from flashfusemoe.spec import ACTIVATIONS, RouterConfig, activate, is_glu, sort_slots_by_expert
from tests.strategies import Problem, problems, randn, skew_bias, topk_ids

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = dict(rtol=2e-5, atol=2e-5)


def _dev(*ts):
    return [t.to(DEV) for t in ts]


@given(problems(max_world=1), st.sampled_from([0.0, 0.3]))
def test_triton_metadata_equals_stable_sort(p, drop_frac):
    (ids,) = _dev(topk_ids(p, drop_frac=drop_frac))
    meta, with_tokens = routing_metadata(ids, p.E), routing_metadata(ids, p.E, row_tokens=True)
    slots, counts = sort_slots_by_expert(ids, p.E)
    S = slots.numel()
    assert torch.equal(meta.row_slot_M[:S].long(), slots)
    assert torch.equal(meta.bounds_E1.long(), torch.cumsum(torch.cat([counts.new_zeros(1), counts]), 0))
    assert meta.row_token_M.numel() == 0
    assert torch.equal(with_tokens.row_token_M[:S].long(), slots // p.K)
    assert torch.equal(with_tokens.pos_TK, meta.pos_TK) and torch.equal(with_tokens.bounds_E1, meta.bounds_E1)
    assert torch.equal(with_tokens.row_slot_M[:S], meta.row_slot_M[:S])
    pos = meta.pos_TK.reshape(-1).long()
    assert torch.equal(pos[slots], torch.arange(S, device=DEV))
    assert bool((pos[ids.reshape(-1) < 0] == -1).all())


@given(problems(max_world=1), st.sampled_from([0.0, 0.3]))
def test_triton_gather_is_bit_exact_and_combine_matches(p, drop_frac):
    x, ids, w = _dev(
        randn(p, p.T, p.D), topk_ids(p, drop_frac=drop_frac), torch.rand(p.T, p.K, generator=p.gen(3))
    )
    meta = routing_metadata(ids, p.E)
    x_rows = gather_rows(x, meta.row_slot_M, meta.live, p.K)
    slots, _ = sort_slots_by_expert(ids, p.E)
    S = slots.numel()
    assert torch.equal(x_rows[:S], x[slots // p.K])
    kept = (ids >= 0).float()
    torch.testing.assert_close(
        combine_rows(x_rows, meta.pos_TK, w), x * (w * kept).sum(-1, keepdim=True), **TOL
    )
    torch.testing.assert_close(combine_rows(x_rows, meta.pos_TK), x * kept.sum(-1, keepdim=True), **TOL)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("N, I", [(1, 1), (13, 7), (40, 150), (5, 2100)])
def test_triton_activation_forward_backward(activation, N, I):
    F_ = 2 * I if is_glu(activation) else I
    h = torch.randn(N, F_, device=DEV, requires_grad=True)
    ga = torch.randn(N, I, device=DEV)
    weights = torch.rand(N + 3, device=DEV)  # 3 slots own no row: their weight gradient is 0
    row_slot = torch.randperm(N + 3, device=DEV)[:N].int()
    live = torch.tensor([N], dtype=torch.int32, device=DEV)
    a_ref = activate(h, activation)
    torch.testing.assert_close(activation_forward(h.detach(), activation, live), a_ref.detach(), **TOL)
    w_rows = weights[row_slot.long()]
    (a_ref * ga * w_rows[:, None]).sum().backward()
    for overwrite_h in (False, True):
        h_in = h.detach().clone()
        grad_h, wa, gw = activation_backward(
            h_in, ga.clone(), activation, live, weights, row_slot, overwrite_h
        )
        assert (grad_h.data_ptr() == h_in.data_ptr()) == overwrite_h
        torch.testing.assert_close(grad_h, h.grad, **TOL)
        torch.testing.assert_close(wa, a_ref.detach() * w_rows[:, None], **TOL)
        gw_rows = (ga * a_ref.detach()).sum(-1)
        gw_expected = torch.zeros(N + 3, device=DEV).index_put_((row_slot.long(),), gw_rows)
        torch.testing.assert_close(gw, gw_expected, **TOL)


def _groups(M, E, g):
    counts = torch.bincount(torch.randint(0, E, (M,), generator=g), minlength=E)  # some groups empty
    return counts, _dev(torch.cumsum(counts, 0).int())[0]


def _paths(*operands):
    """Our two Triton paths, the TMA one where its layout rules hold (and on a GPU, its hardware)."""
    tma = all(map(tma_layout_ok, operands)) if DEV.type == "cpu" else tma_ok(*operands)
    return ["triton"] + (["tma"] if tma else [])


def _align(n, aligned):
    """``n`` rounded up to 4 fp32 elements (16 bytes, a TMA row stride) when ``aligned``."""
    return -(-n // 4) * 4 if aligned else n


# rows M, inner dim, output dim, experts E, 16-byte aligned dims (so TMA runs too)
_GEMM_DIMS = (st.integers(0, 40), st.integers(1, 20), st.integers(1, 20), st.integers(1, 6), st.booleans())


@given(*_GEMM_DIMS, st.integers(0, 2**31 - 1))
def test_triton_grouped_gemms_match_per_expert_matmuls(M, Kd, N, E, aligned, seed):
    Kd, N = _align(Kd, aligned), _align(N, aligned)
    g = torch.Generator().manual_seed(seed)
    counts, offs = _groups(M, E, g)
    a, b, bt, c = _dev(
        torch.randn(M, Kd, generator=g),
        torch.randn(E, Kd, N, generator=g),
        torch.randn(E, N, Kd, generator=g),
        torch.randn(M, N, generator=g),
    )
    (base,) = _dev(torch.randn(E, Kd, N, generator=g))  # a gradient buffer to add into
    for path in _paths(a, b, bt.transpose(1, 2), c):
        out, out_t, wgrad = (
            grouped_mm(a, b, offs, path),
            grouped_mm(a, bt.transpose(1, 2), offs, path),
            grouped_mm_wgrad(a, c, offs, path),
        )
        acc = base.clone()
        assert grouped_mm_wgrad(a, c, offs, path, out=acc) is acc
        torch.testing.assert_close(acc, base + wgrad, **TOL, msg=lambda m, p=path: f"{p}: {m}")
        start = 0
        for e, n in enumerate(counts.tolist()):
            rows = slice(start, start + n)
            torch.testing.assert_close(out[rows], a[rows] @ b[e], **TOL, msg=lambda m, p=path: f"{p}: {m}")
            torch.testing.assert_close(
                out_t[rows], a[rows] @ bt[e].t(), **TOL, msg=lambda m, p=path: f"{p}: {m}"
            )
            torch.testing.assert_close(
                wgrad[e], a[rows].t() @ c[rows], **TOL, msg=lambda m, p=path: f"{p}: {m}"
            )
            start += n


@pytest.mark.skipif(
    DEV.type == "cuda" and not tma_ok(torch.empty(1, device=DEV, dtype=torch.bfloat16)), reason="TMA"
)
def test_triton_tma_wgrad_tile_groups_cover_every_tile():
    """The weight gradient's tile order (``GROUP_P`` row strips per column sweep), with a short last
    group and a partial last column tile: every output tile written once, right, on every expert."""
    g = torch.Generator().manual_seed(3)
    dtype = torch.float32 if DEV.type == "cpu" else torch.bfloat16
    BP, BQ = tma_gemm._tiles(dtype, False)[:2]
    P, Q = 5 * BP, BQ + 8  # 5 strips: groups of 2, 2, 1
    (offs,) = _dev(torch.tensor([7, 19], dtype=torch.int32))  # two experts: 7 and 12 rows
    a, b = (t.to(DEV, dtype) for t in (torch.randn(19, P, generator=g), torch.randn(19, Q, generator=g)))
    with mock.patch.object(tma_gemm, "_WGRAD_GROUP_P", 2):
        got = tma_gemm.tma_grouped_wgrad(a, b, offs).float()
    a, b = a.float(), b.float()
    want = torch.stack([a[:7].t() @ b[:7], a[7:].t() @ b[7:]])
    torch.testing.assert_close(got, want, **(TOL if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-1)))


@pytest.mark.skipif(
    DEV.type == "cuda" and not tma_ok(torch.empty(1, device=DEV, dtype=torch.bfloat16)), reason="TMA"
)
@pytest.mark.parametrize("gathered", [False, True])
def test_triton_tma_glu_h_through_descriptors_equals_masked_stores(gathered):
    """A GLU's ``h`` stored through TMA descriptors for whole row tiles (partial tiles masked, none
    written into the next group's rows): bit-identical to the masked stores of the flattened loop, for
    groups of 2 whole tiles + 2 rows, none, one whole tile, 7 rows; equal to the math too."""
    g = torch.Generator().manual_seed(5)
    dtype = torch.float32 if DEV.type == "cpu" else torch.bfloat16
    BM = tma_gemm._tiles(dtype, True)[0]
    counts = [2 * BM + 2, 0, BM, 7]
    M, Kd, N = sum(counts), 16, 2 * 48
    (offs,) = _dev(torch.tensor(counts).cumsum(0).int())
    a, b = (
        t.to(DEV, dtype) for t in (torch.randn(M + 3, Kd, generator=g), torch.randn(4, Kd, N, generator=g))
    )
    gather = (torch.randperm(M, generator=g).int().to(DEV) * 2, 2) if gathered else None
    outs = {}
    for by_tma in (False, True):
        with mock.patch.object(tma_gemm, "_h_by_tma", lambda *args, v=by_tma: v):
            outs[by_tma] = tma_gemm.tma_grouped_mm(a, b, offs, "swiglu", gather)
    for ours, masked in zip(outs[True], outs[False], strict=True):  # rows past the groups: unwritten
        assert torch.equal(ours[:M], masked[:M])
    rows = a[gather[0].long() // 2] if gathered else a[:M]
    want = torch.cat(
        [
            rows[s:e].float() @ b[i].float()
            for i, (s, e) in enumerate(zip([0, *offs[:-1].tolist()], offs.tolist(), strict=True))
        ]
    )
    tol = TOL if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-1)
    torch.testing.assert_close(outs[True][0][:M].float(), want, **tol)
    assert tma_gemm._h_by_tma(True, True, 1024, False) and not tma_gemm._h_by_tma(True, True, 1024, True)
    assert tma_gemm._h_by_tma(True, True, 2048, True) and not tma_gemm._h_by_tma(False, True, 4096, False)


@given(*_GEMM_DIMS, st.sampled_from([1, 3]), st.integers(0, 2**31 - 1))
def test_triton_grouped_mm_reads_rows_through_slot_index(M, Kd, N, E, aligned, div, seed):
    """``gather = (idx, div)``: bit-identical to the same GEMM on the rows gathered first
    (``src[idx // div]``; on TMA they are read in place, never copied), and equal to the math."""
    Kd, N = _align(Kd, aligned), _align(N, aligned)
    g = torch.Generator().manual_seed(seed)
    counts, offs = _groups(M, E, g)
    S = M // div + 2
    src, b = _dev(torch.randn(S, Kd, generator=g), torch.randn(E, Kd, N, generator=g))
    (idx,) = _dev(torch.randint(0, S * div, (M,), generator=g, dtype=torch.int32))
    rows = idx.long() // div
    live = int(offs[-1]) if E else 0
    for path in _paths(src, b):
        msg = lambda m, p=path: f"{p}: {m}"  # noqa: E731
        got = grouped_mm(src, b, offs, path, gather=(idx, div))[:live]
        want = grouped_mm(src[rows], b, offs, path)[:live]
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=msg)
        start = 0
        for e, n in enumerate(counts.tolist()):
            r = slice(start, start + n)
            torch.testing.assert_close(got[r], src[rows[r]] @ b[e], **TOL, msg=msg)
            start += n


@given(
    st.sampled_from(ACTIVATIONS),
    st.integers(0, 40),
    st.integers(1, 20),
    st.integers(1, 20),
    st.integers(1, 6),
    st.booleans(),
    st.booleans(),
    st.sampled_from([0, 1, 3]),
    st.integers(0, 2**31 - 1),
)
def test_triton_grouped_mm_act_matches_gemm_then_reference_activation(
    activation, M, Kd, I, E, kmajor, aligned, div, seed
):
    """GEMM + activation epilogue; with ``div`` > 0 the rows are gathered (``src[idx // div]``)."""
    Kd, I = _align(Kd, aligned), _align(I, aligned)
    g = torch.Generator().manual_seed(seed)
    counts, offs = _groups(M, E, g)
    F = 2 * I if is_glu(activation) else I
    (src,) = _dev(torch.randn(M + 2, Kd, generator=g))
    (w,) = _dev(torch.randn(E, F, Kd, generator=g))  # w_up's layout: b = w.T per expert, K-major
    b = w.transpose(1, 2) if kmajor else w.transpose(1, 2).contiguous()
    if div:
        (idx,) = _dev(torch.randint(0, (M + 2) * div, (M,), generator=g, dtype=torch.int32))
        a, gather = src[idx.long() // div], (idx, div)
    else:
        a, gather = src[:M], None
    for path in _paths(src, b) if glu_halves_ok(b, activation) else ["triton"]:
        h, act = grouped_mm_act(src if div else a, b, offs, activation, path, gather)
        start = 0
        for e, n in enumerate(counts.tolist()):
            rows = slice(start, start + n)
            h_ref = a[rows] @ b[e]
            torch.testing.assert_close(h[rows], h_ref, **TOL, msg=lambda m, p=path: f"{p}: {m}")
            torch.testing.assert_close(
                act[rows], activate(h[rows], activation), **TOL, msg=lambda m, p=path: f"{p}: {m}"
            )
            start += n


def test_triton_gathered_gemms_read_rows_in_place_up_to_a_width():
    """Where TMA runs, gathered rows are read in place up to ``_FUSE_MAX_N`` output columns and
    permuted first beyond it (CUTLASS + activation kernel were faster there); same results."""
    g = torch.Generator().manual_seed(4)
    counts, offs = _groups(12, 3, g)
    src, b = _dev(torch.randn(8, 16, generator=g), torch.randn(3, 16, 24, generator=g))
    (idx,) = _dev(torch.randint(0, 16, (12,), generator=g, dtype=torch.int32))
    live = int(offs[-1])
    results = []
    for max_n, in_place in ((24, True), (23, False)):
        with (
            mock.patch.object(grouped_gemm, "tma_ok", lambda *ts: all(map(tma_layout_ok, ts))),
            mock.patch.object(grouped_gemm, "_FUSE_MAX_N", max_n),
            mock.patch.object(grouped_gemm, "gather_rows", wraps=grouped_gemm.gather_rows) as permute,
        ):
            h, a = grouped_mm_act(src, b, offs, "swiglu", gather=(idx, 2))
            h_plain = grouped_mm(src, b, offs, gather=(idx, 2))
        assert permute.called != in_place
        results.append((h[:live], a[:live], h_plain[:live]))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, **TOL)


def _cfg_strategy():
    return st.builds(
        dict,
        score_func=st.sampled_from(["softmax", "sigmoid"]),
        renormalize=st.booleans(),
        routed_scaling_factor=st.sampled_from([1.0, 2.5]),
        groups=st.booleans(),
        bias=st.booleans(),
    )


def _assert_same_routing(got, want):
    """Ids, slots per expert and dropped slots equal; weights and both losses within TOL."""
    assert torch.equal(got.topk_ids_TK.long(), want.topk_ids_TK)
    torch.testing.assert_close(got.topk_weights_TK, want.topk_weights_TK, **TOL)
    assert torch.equal(got.tokens_per_expert_E, want.tokens_per_expert_E)
    torch.testing.assert_close(got.load_balance_loss, want.load_balance_loss, **TOL)
    torch.testing.assert_close(got.z_loss, want.z_loss, **TOL)
    assert torch.equal(got.dropped_slots, want.dropped_slots)


@given(problems(max_world=1), _cfg_strategy())
def test_triton_router_matches_reference(p, opts):
    E = p.E if not opts["groups"] else 2 * p.E  # groups need E divisible by num_groups
    K = min(p.K, E)
    groups = dict(num_groups=2, topk_groups=1) if opts["groups"] else {}
    if groups and K > E // 2:
        K = E // 2
    cfg = RouterConfig(
        top_k=K,
        score_func=opts["score_func"],
        renormalize=opts["renormalize"],
        routed_scaling_factor=opts["routed_scaling_factor"],
        **groups,
    )
    logits = randn(p, p.T, E).to(DEV).requires_grad_()
    bias = (torch.rand(E, generator=p.gen(4)) * 0.1).to(DEV) if opts["bias"] else None
    got, want = tri_route(logits, cfg, bias), ref.route(logits, cfg, bias)
    _assert_same_routing(got, want)
    cot = torch.randn(p.T, K, generator=p.gen(6)).to(DEV)
    # each output alone (the others get no gradient at all), then all three together
    for c_w, c_lb, c_z in [(1.0, 0, 0), (0, 0.3, 0), (0, 0, 0.2), (1.0, 0.3, 0.2)]:
        grads = []
        for r in (got, want):
            terms = [(r.topk_weights_TK * cot).sum() * c_w] if c_w else []
            terms += [r.load_balance_loss * c_lb] if c_lb else []
            terms += [r.z_loss * c_z] if c_z else []
            grads.append(torch.autograd.grad(sum(terms), logits, retain_graph=True)[0])
        torch.testing.assert_close(grads[0], grads[1], **TOL)


@pytest.mark.parametrize("programs", [512, 3])
def test_triton_router_stats_over_many_blocks(programs, monkeypatch):
    """600 tokens, E=128: 38 token blocks, more than one pass of the stats kernel's block loop; with 3
    programs, 13 blocks each (the last one partly past T); plain softmax, and sigmoid with a bias and
    group-limited routing."""
    import flashfusemoe.backends.triton.router as router

    monkeypatch.setattr(router, "ROUTER_PROGRAMS", programs)
    T, E, K = 600, 128, 8
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(5)).to(DEV).requires_grad_()
    bias = (torch.randn(E, generator=torch.Generator().manual_seed(6)) * 0.05).to(DEV)
    for cfg, b in [
        (RouterConfig(top_k=K), None),
        (RouterConfig(top_k=K, score_func="sigmoid", num_groups=8, topk_groups=4), bias),
    ]:
        got, want = tri_route(logits, cfg, b), ref.route(logits, cfg, b)
        _assert_same_routing(got, want)
        grads = [torch.autograd.grad(r.load_balance_loss + r.z_loss, logits)[0] for r in (got, want)]
        torch.testing.assert_close(grads[0], grads[1], **TOL)


@given(
    problems(max_world=1, allow_empty=False),
    st.sampled_from([None, (2, 1), (4, 2)]),
    st.sampled_from(["softmax", "sigmoid"]),
    st.integers(0, 2**31 - 1),
)
def test_both_routers_pick_the_same_distinct_experts_under_ties_and_non_finite_scores(p, groups, score, seed):
    """Tied scores (logits from a few values), selection biases of -inf, +inf and NaN, NaN logits:
    the triton router and the reference pick the same K distinct experts, ties to the lowest id, a
    NaN counting as -inf, within the chosen groups; a token with a NaN logit gets NaN weights."""
    G, g = groups or (1, 1)
    E = G * max(p.E, 2)
    K = min(p.K, g * (E // G))
    g_ = torch.Generator().manual_seed(seed)
    logits = torch.randint(-1, 2, (p.T, E), generator=g_).float()
    logits[torch.rand(p.T, E, generator=g_) < 0.1] = float("nan")
    special = torch.tensor([0.0, 0.5, float("-inf"), float("inf"), float("nan")])
    bias = special[torch.randint(0, 5, (E,), generator=g_)]
    cfg = RouterConfig(top_k=K, score_func=score, num_groups=groups and G, topk_groups=groups and g)
    got = tri_route(logits.to(DEV), cfg, bias.to(DEV))
    want = ref.route(logits, cfg, bias)
    ids = got.topk_ids_TK.long().cpu()
    assert torch.equal(ids, want.topk_ids_TK)
    assert all(len(set(row)) == K for row in ids.tolist())
    torch.testing.assert_close(got.topk_weights_TK.cpu(), want.topk_weights_TK, equal_nan=True, **TOL)
    assert torch.equal(torch.isnan(want.topk_weights_TK).all(1), torch.isnan(logits).any(1))
    assert torch.equal(got.tokens_per_expert_E.cpu(), want.tokens_per_expert_E)


def test_minus_inf_and_nan_biases_select_the_lowest_free_ids_on_both_backends():
    """The cases of the report: bias [0, -inf, -inf, -inf] and a NaN in the bias, K = 2."""
    logits = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    for bias, counts in (
        ([0.0, -float("inf"), -float("inf"), -float("inf")], [8, 8, 0, 0]),
        ([0.0, 0.0, 0.0, float("nan")], None),
    ):
        bias = torch.tensor(bias)
        for route in (tri_route, ref.route):
            r = route(logits.to(DEV), RouterConfig(top_k=2), bias.to(DEV))
            ids = r.topk_ids_TK.long().cpu()
            assert all(len(set(row)) == 2 for row in ids.tolist())
            if counts is not None:
                assert r.tokens_per_expert_E.tolist() == counts
            else:
                assert not bool(
                    (ids == 3).any()
                )  # a NaN bias counts as -inf: never picked while others are free


def test_triton_router_nan_token_gets_nan_weights_and_valid_ids():
    logits = torch.randn(6, 8, device=DEV)
    logits[3, 2] = float("nan")
    r = tri_route(logits, RouterConfig(top_k=2))
    assert torch.isnan(r.topk_weights_TK[3]).all()
    assert torch.isfinite(r.topk_weights_TK[[0, 1, 2, 4, 5]]).all()
    assert bool(((r.topk_ids_TK >= 0) & (r.topk_ids_TK < 8)).all())


@given(
    problems(max_world=1),
    st.sampled_from(["swiglu", "geglu", "relu2", "silu"]),
    st.booleans(),
    st.sampled_from([0.0, 0.3]),
    st.booleans(),
)
def test_triton_experts_match_reference(p, activation, recompute, drop_frac, tma):
    """With ``tma`` on CPU, the TMA kernels are let in wherever their layout rules hold (as on Hopper),
    so the interpreter runs the fused up projection (gather + GEMM + activation) end to end."""
    if tma and DEV.type == "cpu":
        p = dataclasses.replace(p, D=_align(p.D, True), I=_align(p.I, True))
        with mock.patch.object(grouped_gemm, "tma_ok", lambda *ts: all(map(tma_layout_ok, ts))):
            _experts_match_reference(p, activation, recompute, drop_frac)
    else:
        _experts_match_reference(p, activation, recompute, drop_frac)


def _experts_match_reference(p, activation, recompute, drop_frac):
    F_ = 2 * p.I if is_glu(activation) else p.I
    ids = topk_ids(p, drop_frac=drop_frac).to(DEV)
    leaves = [
        t.to(DEV).requires_grad_()
        for t in (
            randn(p, p.T, p.D),
            torch.rand(p.T, p.K, generator=p.gen(7)),
            randn(p, p.E, F_, p.D, salt=1),
            randn(p, p.E, p.D, p.I, salt=2),
        )
    ]
    cot = randn(p, p.T, p.D, salt=3).to(DEV)
    results = []
    for fn in (tri_experts, ref.experts):
        x, w, up, down = (t.detach().clone().requires_grad_() for t in leaves)
        out = fn(x, ids, w, up, down, activation, recompute)
        (out * cot).sum().backward()
        results.append((out, x.grad, w.grad, up.grad, down.grad))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("frozen", ["w_up", "w_down", "both"])
def test_triton_experts_spend_no_gemm_on_frozen_expert_weights(frozen):
    """A frozen expert weight (fine-tuning around the experts) gets no gradient and costs no weight-
    gradient GEMM (FlopCounterMode: 2*N*F*D or 2*N*D*I less); every other gradient is unchanged."""
    from torch.utils.flop_counter import FlopCounterMode

    p = Problem(T=9, D=6, E=3, K=2, I=5, W=1, skew="uniform", seed=5)
    ids, w = topk_ids(p).to(DEV), torch.rand(9, 2, device=DEV)
    leaves = _dev(randn(p, 9, 6), randn(p, 3, 10, 6, salt=1), randn(p, 3, 6, 5, salt=2))
    runs = []
    for freeze in ((), {"w_up": (1,), "w_down": (2,), "both": (1, 2)}[frozen]):
        x, up, down = (t.clone().requires_grad_(i not in freeze) for i, t in enumerate(leaves))
        with FlopCounterMode(display=False) as mode:
            tri_experts(x, ids, w, up, down, "swiglu").square().sum().backward()
        runs.append((mode.get_total_flops(), x.grad, up.grad, down.grad))
    N = 9 * 2
    saved = (frozen != "w_down") * 2 * N * 10 * 6 + (frozen != "w_up") * 2 * N * 6 * 5
    assert runs[0][0] - runs[1][0] == saved
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=0, atol=0)
    assert (runs[1][2] is None) == (frozen != "w_down") and (runs[1][3] is None) == (frozen != "w_up")
    for got, want in zip(runs[1][2:], runs[0][2:], strict=True):
        if got is not None:
            assert torch.equal(got, want)


@pytest.mark.skipif(
    DEV.type != "cpu", reason="paths forced on the interpreter; on a GPU they are the real ones"
)
def test_triton_recompute_takes_the_forwards_gemm_path_where_the_glu_epilogue_cannot_run():
    """w_up stored [E, D, F] (N-major) with a GLU half not a multiple of 16 bytes: the fused TMA
    epilogue cannot split the halves, so the up projection runs unfused; its recompute in backward must
    take the same GEMM path (the TMA kernel reading rows through the index), or gradients with recompute
    differ from those without by rounding. Paths forced as on Hopper: TMA and CUTLASS both allowed."""
    p = Problem(T=9, D=8, E=3, K=2, I=6, W=1, skew="uniform", seed=6)
    ids, w = topk_ids(p).to(DEV), torch.rand(9, 2, device=DEV)
    x0 = randn(p, 9, 8)
    up0 = randn(p, 3, 8, 12, salt=1).transpose(1, 2)  # [E, F, D] view of [E, D, F] storage
    down0 = randn(p, 3, 8, 6, salt=2)
    assert not glu_halves_ok(up0.transpose(1, 2), "swiglu") and tma_layout_ok(up0.transpose(1, 2))
    aligned = lambda *ts: all(map(tma_layout_ok, ts))  # noqa: E731
    grads = []
    with (
        mock.patch.object(grouped_gemm, "tma_ok", aligned),
        mock.patch.object(grouped_gemm, "_torch_grouped_mm_ok", aligned),
    ):
        for recompute in (False, True):
            x, up, down = (t.clone().requires_grad_() for t in (x0, up0, down0))
            tri_experts(x, ids, w, up, down, "swiglu", recompute).square().sum().backward()
            grads.append((x.grad, up.grad, down.grad))
    for got, want in zip(*grads, strict=True):
        assert torch.equal(got, want)


def test_triton_experts_t1_and_k_equals_e_and_t0():
    for T, E, K in [(1, 5, 2), (6, 4, 4), (0, 3, 2)]:
        p = Problem(T=T, D=7, E=E, K=K, I=5, W=1, skew="uniform", seed=T + E)
        ids = topk_ids(p).to(DEV)
        x = randn(p, T, 7).to(DEV).requires_grad_()
        w = torch.rand(T, K, device=DEV)
        up, down = randn(p, E, 10, 7, salt=1).to(DEV), randn(p, E, 7, 5, salt=2).to(DEV)
        out = tri_experts(x, ids, w, up, down, "swiglu")
        torch.testing.assert_close(out, ref.experts(x, ids, w, up, down, "swiglu"), rtol=1e-4, atol=1e-4)
        out.sum().backward()
        assert x.grad.shape == (T, 7)


def test_triton_second_backward_needs_recompute():
    """The eager backward reuses the saved activations' buffer: a second backward through the same
    graph raises a clear error, and works with recompute (nothing saved to reuse)."""
    p = Problem(T=9, D=6, E=3, K=2, I=5, W=1, skew="uniform", seed=3)
    ids = topk_ids(p).to(DEV)
    w = torch.rand(9, 2, device=DEV)
    up, down = randn(p, 3, 10, 6, salt=1).to(DEV), randn(p, 3, 6, 5, salt=2).to(DEV)
    grads = {}
    for recompute in (False, True):
        x = randn(p, 9, 6).to(DEV).requires_grad_()
        out = tri_experts(x, ids, w, up, down, "swiglu", recompute)
        (g1,) = torch.autograd.grad(out.sum(), x, retain_graph=True)
        if recompute:
            (g2,) = torch.autograd.grad(out.sum(), x)
            assert torch.equal(g1, g2)
        else:
            with pytest.raises(RuntimeError, match="recompute_activations=True"):
                torch.autograd.grad(out.sum(), x)
        grads[recompute] = g1
    torch.testing.assert_close(grads[False], grads[True], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "relu2", "gelu"])
@pytest.mark.parametrize("R, D, I", [(0, 5, 3), (1, 7, 5), (13, 6, 9)])
def test_triton_expert_mlp_matches_reference_and_keeps_only_h(activation, R, D, I):
    """The shared experts' MLP: output and every gradient equal the reference's, fresh random inputs,
    odd shapes, no rows; it saves h ``[R, F]`` beside its inputs (with recompute nothing but them), and
    with recompute the gradients are bit-identical to keeping h."""
    F_ = 2 * I if is_glu(activation) else I
    g = torch.Generator().manual_seed(R * 100 + D + I)
    leaves = _dev(
        torch.randn(R, D, generator=g), torch.randn(F_, D, generator=g), torch.randn(D, I, generator=g)
    )
    cot = _dev(torch.randn(R, D, generator=g))[0]
    results, saved = {}, {}
    for name, recompute in (("ref", False), ("ours", False), ("ours, recompute", True)):
        fn = ref.expert_mlp if name == "ref" else get_backend("triton", DEV).expert_mlp
        x, up, down = (t.clone().requires_grad_() for t in leaves)
        shapes = []

        def pack(t, shapes=shapes):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(x, up, down, activation, recompute)
        (out * cot).sum().backward()
        results[name], saved[name] = (out, x.grad, up.grad, down.grad), shapes
    for got, want in zip(results["ours"], results["ref"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for got, want in zip(results["ours, recompute"], results["ours"], strict=True):
        assert torch.equal(got, want)
    inputs = {(R, D), (F_, D), (D, I)}
    assert sorted(saved["ours"]) == sorted(inputs | {(R, F_)}) and set(saved["ours, recompute"]) <= inputs | {
        (0,)
    }


def test_triton_expert_mlp_spends_no_gemm_on_frozen_weights():
    """Frozen weights (no grad): x's gradient equals the reference's and the backward runs only the
    GEMMs it needs, grad_a and grad_x (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    R, D, F_, I = 5, 4, 6, 3
    x, up, down = _dev(torch.randn(R, D), torch.randn(F_, D), torch.randn(D, I))
    grads = []
    for mlp in (ref.expert_mlp, get_backend("triton", DEV).expert_mlp):
        xg = x.clone().requires_grad_()
        with FlopCounterMode(display=False) as mode:
            mlp(xg, up, down, "swiglu").square().sum().backward()
        grads.append(xg.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-4)
    forward, backward = 2 * R * F_ * D + 2 * R * I * D, 2 * R * D * I + 2 * R * F_ * D
    assert mode.get_total_flops() == forward + backward


def test_triton_expert_mlp_second_backward_needs_recompute():
    """As for the routed experts: the eager backward writes grad_h over the kept h, so a second
    backward through the graph raises the clear error; with recompute it works."""
    x, up, down = _dev(torch.randn(5, 4), torch.randn(6, 4), torch.randn(4, 3))
    mlp = get_backend("triton", DEV).expert_mlp
    for recompute in (False, True):
        xg = x.clone().requires_grad_()
        out = mlp(xg, up, down, "swiglu", recompute)
        (g1,) = torch.autograd.grad(out.sum(), xg, retain_graph=True)
        if recompute:
            assert torch.equal(g1, torch.autograd.grad(out.sum(), xg)[0])
        else:
            with pytest.raises(RuntimeError, match="recompute_activations=True"):
                torch.autograd.grad(out.sum(), xg)


@pytest.mark.parametrize("reentrant", [False, True])
def test_triton_experts_under_activation_checkpointing(reentrant):
    """torch.utils.checkpoint around the experts (the backward reuses the recomputed activations'
    buffer): gradients equal the plain run's."""
    p = Problem(T=9, D=6, E=3, K=2, I=5, W=1, skew="uniform", seed=4)
    ids = topk_ids(p).to(DEV)
    w = torch.rand(9, 2, device=DEV)
    up, down = randn(p, 3, 10, 6, salt=1).to(DEV), randn(p, 3, 6, 5, salt=2).to(DEV)
    grads = []
    for checkpointed in (False, True):
        x = randn(p, 9, 6).to(DEV).requires_grad_()
        up_ = up.clone().requires_grad_()
        fn = lambda x, up_: tri_experts(x, ids, w, up_, down, "swiglu")  # noqa: E731
        if checkpointed:
            out = torch.utils.checkpoint.checkpoint(fn, x, up_, use_reentrant=reentrant)
        else:
            out = fn(x, up_)
        out.square().sum().backward()
        grads.append((x.grad, up_.grad))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@given(problems(max_world=1), st.sampled_from([0.0, 0.3]))
def test_triton_metadata_sized_by_a_slot_bound_ignores_other_ranks_ids(p, drop_frac):
    """EP rows: ids -1 (another rank's expert) and beyond E get no row; buffers of ``num_rows`` = the
    kept slots hold the same layout as the full-size ones."""
    ids = topk_ids(p, drop_frac=drop_frac)
    ids = torch.where(torch.rand(ids.shape, generator=p.gen(5)) < 0.2, p.E + 3, ids).to(DEV)
    kept = int(((ids >= 0) & (ids < p.E)).sum())
    full, bounded = routing_metadata(ids, p.E), routing_metadata(ids, p.E, kept)
    assert bounded.row_slot_M.shape == (kept,)
    assert torch.equal(bounded.row_slot_M, full.row_slot_M[:kept])
    assert torch.equal(bounded.pos_TK, full.pos_TK) and torch.equal(bounded.offs_E, full.offs_E)
    slots, _ = sort_slots_by_expert(ids, p.E)
    assert torch.equal(full.row_slot_M[:kept].long(), slots)


def test_triton_metadata_never_writes_past_a_too_small_bound():
    ids = torch.tensor([[0, 1], [1, 0], [0, 0]], device=DEV)
    meta = routing_metadata(ids, 2, 4)
    assert int(meta.offs_E[-1]) == 4 and int((meta.pos_TK >= 0).sum()) == 4


@given(problems(max_world=1, allow_empty=False))
def test_triton_experts_with_a_slot_bound_equal_the_unbounded_ones(p):
    ids = topk_ids(p, drop_frac=0.3).to(DEV)
    kept = int((ids >= 0).sum())
    x = randn(p, p.T, p.D).to(DEV)
    w = torch.rand(p.T, p.K, generator=p.gen(7)).to(DEV)
    up, down = randn(p, p.E, 2 * p.I, p.D, salt=1).to(DEV), randn(p, p.E, p.D, p.I, salt=2).to(DEV)
    results = []
    for bound in (None, kept):
        leaves = [t.clone().requires_grad_() for t in (x, w, up, down)]
        out = tri_experts(leaves[0], ids, leaves[1], leaves[2], leaves[3], "swiglu", num_slots=bound)
        out.sum().backward()
        results.append([out] + [t.grad for t in leaves])
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)


def test_triton_backend_needs_cuda_or_an_interpreter_set_before_import(monkeypatch):
    """Triton reads TRITON_INTERPRET when kernels are defined: the value at import decides."""
    import flashfusemoe.backends.triton as tri

    monkeypatch.setattr(tri, "_INTERPRETED", False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run on cpu: needs CUDA"):
        get_backend("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(
        RuntimeError, match="TRITON_INTERPRET=1 was set after the triton backend was imported"
    ):
        get_backend("triton", "cpu")
    assert get_backend(None, "cpu").NAME == "torch"


@pytest.mark.skipif(DEV.type != "cpu", reason="the CPU interpreter's dtype rule; GPUs run 16-bit")
def test_triton_on_the_cpu_interpreter_refuses_16_bit():
    layer = MoELayer(8, 12, 4, 2, backend="triton").to(torch.bfloat16)
    x = torch.randn(3, 8).to(torch.bfloat16)
    with pytest.raises(TypeError, match="the triton backend on the CPU interpreter computes fp32 only"):
        layer(x)


def test_triton_experts_accept_non_contiguous_inputs_and_weights():
    """Strided x (a column slice) and weights stored transposed give the reference's result."""
    p = Problem(T=9, D=6, E=3, K=2, I=5, W=1, skew="uniform", seed=11)
    ids, w = topk_ids(p).to(DEV), torch.rand(9, 2, device=DEV)
    x_wide = randn(p, 9, 12).to(DEV)
    x = x_wide[:, ::2]
    up = randn(p, 3, 6, 10, salt=1).to(DEV).transpose(1, 2)  # [E, F=10, D=6], D-major storage
    down = randn(p, 3, 5, 6, salt=2).to(DEV).transpose(1, 2)  # [E, D=6, I=5], I-major storage
    assert not (x.is_contiguous() or up.is_contiguous() or down.is_contiguous())
    got = tri_experts(x, ids, w, up, down, "swiglu")
    want = ref.experts(x.contiguous(), ids, w, up.contiguous(), down.contiguous(), "swiglu")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@given(
    problems(max_world=1, allow_empty=False),
    st.sampled_from(["softmax", "sigmoid"]),
    st.sampled_from([None, 0.6]),
)
def test_triton_layer_matches_torch_layer(p, score_func, capacity_factor):
    """The whole MoELayer (router, losses, shared expert, capacity dropping) on both backends."""
    torch.manual_seed(p.seed % 1000)
    layer = MoELayer(
        p.D,
        2 * p.I,
        p.E,
        num_shared_experts=1,
        router=RouterConfig(top_k=p.K, score_func=score_func, capacity_factor=capacity_factor),
        aux_loss_coeff=0.1,
        z_loss_coeff=0.01,
        use_expert_bias=True,
        backend="torch",
    ).to(DEV)
    layer.expert_bias.copy_(skew_bias(p))
    x = randn(p, p.T, p.D).to(DEV)
    cot = randn(p, p.T, p.D, salt=9).to(DEV)
    results = []
    for backend in ("triton", "torch"):
        run = copy.deepcopy(layer)
        run.backend = backend
        xx = x.clone().requires_grad_()
        out, losses = run(xx)
        ((out * cot).sum() + losses["aux_loss"] + losses["z_loss"]).backward()
        grads = [xx.grad] + [prm.grad for prm in run.parameters()]
        results.append(
            [
                out,
                losses["aux_loss"],
                losses["z_loss"],
                losses["tokens_per_expert"],
                losses["dropped_slots"],
                *grads,
            ]
        )
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@given(st.integers(1, 2**40), st.integers(1, 2**20))
def test_triton_host_size_helpers_match_triton(n, b):
    import triton

    from flashfusemoe.backends.triton.launch import cdiv, next_pow2

    assert next_pow2(n) == triton.next_power_of_2(n)
    assert cdiv(n, b) == triton.cdiv(n, b)


def test_triton_layer_traces_whole_under_torch_compile():
    """Dynamo traces the layer (router config, loopback, custom ops) with no graph break; the
    compiled step equals eager. Inductor itself runs in the GPU tests."""
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 4, 2, num_shared_experts=1, aux_loss_coeff=0.1, backend="triton").to(DEV)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    results = []
    for fn in (compiled, layer):
        x = torch.randn(12, 16, generator=torch.Generator().manual_seed(1)).to(DEV).requires_grad_()
        layer.zero_grad(set_to_none=True)
        out, losses = fn(x)
        (out.square().sum() + losses["aux_loss"]).backward()
        results.append([out, x.grad] + [p.grad for p in layer.parameters()])
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)
