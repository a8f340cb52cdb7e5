"""The torch reference backend against independent formulations and hand-computed router semantics."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from flashfusemoe.backends.torch import dense_experts, expert_mlp, experts, route
from flashfusemoe.spec import ACTIVATIONS, RouterConfig, activate, is_glu
from tests.strategies import Problem, problems, randn, topk_ids


def _weights(p: Problem, activation: str, dtype=torch.float32):
    F_ = 2 * p.I if is_glu(activation) else p.I
    return randn(p, p.E, F_, p.D, salt=1, dtype=dtype) / 2, randn(p, p.E, p.D, p.I, salt=2, dtype=dtype) / 2


@given(problems(max_world=1), st.sampled_from(ACTIVATIONS), st.sampled_from([0.0, 0.3]))
def test_reference_experts_match_dense_formulation(p, activation, drop_frac):
    x_TD = randn(p, p.T, p.D)
    ids_TK = topk_ids(p, drop_frac=drop_frac)
    w_TK = torch.rand(p.T, p.K, generator=p.gen(5))
    w_up, w_down = _weights(p, activation)
    out = experts(x_TD, ids_TK, w_TK, w_up, w_down, activation)
    ref = dense_experts(x_TD, ids_TK, w_TK, w_up, w_down, activation)
    assert out.shape == (p.T, p.D)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_formulas(activation):
    h = torch.randn(5, 6)
    gate, up = h[:, :3], h[:, 3:]
    expected = {
        "swiglu": gate * torch.sigmoid(gate) * up,
        "geglu": 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2))) * up,
        "relu": h.clamp(min=0),
        "gelu": 0.5 * h * (1 + torch.erf(h / math.sqrt(2))),
        "silu": h * torch.sigmoid(h),
        "relu2": h.clamp(min=0) ** 2,
    }[activation]
    torch.testing.assert_close(activate(h, activation), expected)


def test_reference_experts_ignore_ids_of_other_ranks():
    """Under EP a received row's ids outside [0, e) (-1: another rank's expert) contribute nothing."""
    p = Problem(T=6, D=5, E=3, K=2, I=4, W=1, skew="uniform", seed=1)
    w_up, w_down = _weights(p, "swiglu")
    x, w = randn(p, 6, 5), torch.rand(6, 2, generator=p.gen(2))
    ids = torch.tensor([[0, -1], [-1, 2], [1, 0], [-1, -1], [2, -1], [0, 1]])
    out = experts(x, ids, w, w_up, w_down, "swiglu")
    for t in range(6):
        want = sum(
            (
                w[t, k] * expert_mlp(x[t : t + 1], w_up[i], w_down[i], "swiglu")
                for k, i in enumerate(ids[t].tolist())
                if i >= 0
            ),
            torch.zeros(1, 5),
        )
        torch.testing.assert_close(out[t : t + 1], want)


def test_recompute_gives_identical_gradients():
    p = Problem(T=16, D=8, E=4, K=2, I=6, W=1, skew="uniform", seed=3)
    ids, w = topk_ids(p), torch.rand(p.T, p.K)
    grads = []
    for recompute in (False, True):
        x = randn(p, p.T, p.D).requires_grad_()
        w_up, w_down = (t.requires_grad_() for t in _weights(p, "swiglu"))
        experts(x, ids, w, w_up, w_down, "swiglu", recompute).square().sum().backward()
        grads.append((x.grad, w_up.grad, w_down.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------- router


def _route(logits, **kw):
    return route(logits, RouterConfig(**kw))


def test_softmax_topk_renormalized_matches_hand_computation():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.5, -1.0, 0.0, 4.0]])
    r = _route(logits, top_k=2)
    probs = logits.softmax(-1)
    assert r.topk_ids_TK.tolist() == [[1, 2], [3, 0]]
    expected = torch.stack([probs[0, [1, 2]], probs[1, [3, 0]]])
    torch.testing.assert_close(r.topk_weights_TK, expected / expected.sum(-1, keepdim=True))


def test_no_renormalize_keeps_raw_softmax_and_scaling_multiplies():
    logits = torch.randn(6, 5)
    r = _route(logits, top_k=3, renormalize=False, routed_scaling_factor=2.5)
    expected = logits.softmax(-1).gather(1, r.topk_ids_TK) * 2.5
    torch.testing.assert_close(r.topk_weights_TK, expected)


def test_sigmoid_scores():
    logits = torch.randn(7, 6)
    r = _route(logits, top_k=2, score_func="sigmoid")
    s = logits.sigmoid()
    assert torch.equal(r.topk_ids_TK, s.topk(2).indices)
    sel = s.gather(1, r.topk_ids_TK)
    torch.testing.assert_close(r.topk_weights_TK, sel / sel.sum(-1, keepdim=True))


def test_expert_bias_changes_selection_not_weights():
    logits = torch.randn(32, 8)
    bias = torch.zeros(8)
    bias[5] = 100.0
    r = route(logits, RouterConfig(top_k=2, renormalize=False), bias)
    assert (r.topk_ids_TK == 5).any(-1).all()
    torch.testing.assert_close(r.topk_weights_TK, logits.softmax(-1).gather(1, r.topk_ids_TK))


def test_group_limited_routing_selects_only_within_best_groups():
    T, E, G = 20, 8, 4
    logits = torch.randn(T, E)
    r = _route(logits, top_k=2, score_func="sigmoid", num_groups=G, topk_groups=2)
    s = logits.sigmoid().view(T, G, E // G)
    group_score = s.topk(2, dim=-1).values.sum(-1)
    best = group_score.topk(2, dim=-1).indices
    chosen_groups = r.topk_ids_TK // (E // G)
    for t in range(T):
        assert set(chosen_groups[t].tolist()) <= set(best[t].tolist())
        # the choice is the plain top-k within the allowed experts
        allowed = torch.full((E,), float("-inf"))
        for g in best[t].tolist():
            allowed[g * 2 : g * 2 + 2] = logits[t].sigmoid()[g * 2 : g * 2 + 2]
        assert set(r.topk_ids_TK[t].tolist()) == set(allowed.topk(2).indices.tolist())


def test_aux_and_z_loss_formulas():
    T, E, K = 10, 4, 2
    logits = torch.randn(T, E, requires_grad=True)
    r = _route(logits, top_k=K)
    probs = logits.softmax(-1)
    f = torch.bincount(r.topk_ids_TK.reshape(-1), minlength=E).float() / (T * K)
    torch.testing.assert_close(r.load_balance_loss, E * (f * probs.mean(0)).sum())
    torch.testing.assert_close(r.z_loss, torch.logsumexp(logits, -1).square().mean())
    (r.load_balance_loss + r.z_loss).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_balanced_routing_has_unit_load_balance_loss():
    # Near-uniform probabilities, token t picks expert t: even counts, so the loss is 1.
    E = 4
    r = _route(torch.eye(E) * 1e-4, top_k=1)
    assert r.topk_ids_TK.reshape(-1).tolist() == list(range(E))
    torch.testing.assert_close(r.load_balance_loss, torch.tensor(1.0), rtol=1e-3, atol=1e-3)


def test_capacity_drops_first_come_first_served():
    logits = torch.tensor([[5.0, 0.0], [5.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    # capacity = ceil(0.5 * 4 * 1 / 2) = 1 slot per expert
    r = _route(logits, top_k=1, capacity_factor=0.5)
    assert r.topk_ids_TK.reshape(-1).tolist() == [0, -1, -1, 1]
    assert r.topk_weights_TK.reshape(-1)[1:3].tolist() == [0.0, 0.0]
    assert r.dropped_slots.item() == 2
    assert r.tokens_per_expert_E.tolist() == [1, 1]


def test_empty_batch_routes_to_nothing_with_zero_losses():
    logits = torch.zeros(0, 6, requires_grad=True)
    r = _route(logits, top_k=6)
    assert r.topk_ids_TK.shape == (0, 6)
    assert r.load_balance_loss.item() == 0.0 and r.z_loss.item() == 0.0
    assert r.tokens_per_expert_E.tolist() == [0] * 6


def test_k_equals_e_selects_every_expert():
    logits = torch.randn(5, 4)
    r = _route(logits, top_k=4)
    assert (r.topk_ids_TK.sort(-1).values == torch.arange(4)).all()
    torch.testing.assert_close(r.topk_weights_TK.sum(-1), torch.ones(5))


def test_nonfinite_logits_propagate_to_their_token_only():
    logits = torch.randn(4, 5)
    logits[2, 1] = float("nan")
    r = _route(logits, top_k=2)
    assert torch.isnan(r.topk_weights_TK[2]).all()
    assert torch.isfinite(r.topk_weights_TK[[0, 1, 3]]).all()
    assert ((r.topk_ids_TK >= 0) & (r.topk_ids_TK < 5)).all()


def test_router_gradient_matches_softmax_gather():
    logits = torch.randn(9, 6, requires_grad=True)
    r = _route(logits, top_k=2)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = F.softmax(ref_logits, -1).gather(1, r.topk_ids_TK)
    ref = ref / ref.sum(-1, keepdim=True)
    g = torch.randn(9, 2)
    (r.topk_weights_TK * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)


@given(
    st.integers(1, 64),
    st.sampled_from(["softmax", "sigmoid"]),
    st.booleans(),
    st.sampled_from([(None, None), (4, 2), (1, 1)]),
    st.floats(0.1, 10.0),
    st.one_of(st.none(), st.floats(0.01, 4.0)),
)
def test_router_config_crosses_an_op_boundary_whole(top_k, score_func, renormalize, groups, scale, capacity):
    cfg = RouterConfig(top_k, score_func, renormalize, *groups, scale, capacity)
    assert RouterConfig.from_op_arg(cfg.to_op_arg()) == cfg
