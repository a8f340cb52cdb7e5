"""DeepSeek-V3's sequence-wise balance loss (``seq_aux_loss_coeff``): against a per-sequence loop of the
paper's formula (value and gradient, softmax and sigmoid, with a selection bias, T = 0), one sequence
equals the batch load-balance loss, both backends agree, ``MoELayer`` splits ``[B, S, D]`` into its B
sequences, it compiles, and bad arguments are refused by name."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flashfusemoe import MoELayer, RouterConfig, fused_moe
from flashfusemoe.backends.torch.routing import route, sequence_balance_loss


def _paper(logits_TE, topk_ids_TK, S, score_func):
    """The formula of DeepSeek-V3 (section 2.1.2), one sequence at a time:
    ``sum_i f_i P_i`` with ``f_i = E / (K S) * #(slots of the sequence on i)`` and ``P_i`` the mean over
    the sequence of ``s_i / sum_j s_j``; averaged over the sequences."""
    T, E = logits_TE.shape
    K = topk_ids_TK.shape[1]
    losses = []
    for b in range(T // S):
        rows = slice(b * S, (b + 1) * S)
        s = (
            logits_TE[rows].float().softmax(-1)
            if score_func == "softmax"
            else logits_TE[rows].float().sigmoid()
        )
        s = s / s.sum(-1, keepdim=True)
        f = torch.stack([(topk_ids_TK[rows] == i).sum() for i in range(E)]).float() * E / (K * S)
        losses.append((f * s.mean(0)).sum())
    return torch.stack(losses).mean()


@given(
    st.integers(1, 4), st.integers(1, 7), st.integers(1, 9), st.data(),
    st.sampled_from(["softmax", "sigmoid"]), st.booleans(), st.integers(0, 2**16),
)  # fmt: skip
def test_sequence_loss_is_the_papers_formula(B, S, E, data, score_func, biased, seed):
    K = data.draw(st.integers(1, E))
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B * S, E, generator=g)).requires_grad_()
    bias = torch.randn(E, generator=g) if biased else None
    ids = route(logits, RouterConfig(top_k=K, score_func=score_func), bias).topk_ids_TK
    got = sequence_balance_loss(logits, ids, S, score_func)
    (grad,) = torch.autograd.grad(got, logits)
    want = _paper(logits, ids, S, score_func)
    (want_grad,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)


def test_one_sequence_is_the_batch_load_balance_loss():
    logits = torch.randn(24, 6)
    r = route(logits, RouterConfig(top_k=2))
    torch.testing.assert_close(
        sequence_balance_loss(logits, r.topk_ids_TK, 24, "softmax"), r.load_balance_loss
    )


def test_no_tokens_give_zero_still_connected():
    logits = torch.zeros(0, 4, requires_grad=True)
    loss = sequence_balance_loss(logits, torch.zeros(0, 2, dtype=torch.long), 3, "softmax")
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.shape == (0, 4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_layer_splits_its_batch_into_sequences(backend):
    torch.manual_seed(0)
    layer = MoELayer(8, 12, 6, 2, num_shared_experts=1, seq_aux_loss_coeff=0.3, backend=backend)
    x = torch.randn(3, 5, 8)
    out, losses = layer(x)
    logits = x.reshape(15, 8) @ layer.gate_weight.t()
    ids = route(logits, layer.router_config).topk_ids_TK
    want = 0.3 * sequence_balance_loss(logits, ids, 5, "softmax")
    torch.testing.assert_close(losses["seq_aux_loss"], want, rtol=1e-5, atol=1e-6)
    (out.square().sum() + losses["seq_aux_loss"]).backward()
    # the loss's gradient reaches the router: it differs from the gradient without the loss
    grad = layer.gate_weight.grad.clone()
    layer.zero_grad()
    layer.seq_aux_loss_coeff = 0.0
    out, losses = layer(x)
    assert losses["seq_aux_loss"].item() == 0.0
    (out.square().sum() + losses["seq_aux_loss"]).backward()
    assert not torch.allclose(grad, layer.gate_weight.grad)
    # a [T, D] input is one sequence
    layer.seq_aux_loss_coeff = 1.0
    _, flat = layer(x.reshape(15, 8))
    torch.testing.assert_close(flat["seq_aux_loss"], sequence_balance_loss(logits, ids, 15, "softmax"))


def test_compiled_equals_eager():
    torch.manual_seed(0)
    layer = MoELayer(8, 12, 4, 2, seq_aux_loss_coeff=0.1, backend="torch")
    x = torch.randn(2, 6, 8)
    want = layer(x)[1]["seq_aux_loss"]
    got = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)[1]["seq_aux_loss"]
    torch.testing.assert_close(got, want)


def _args():
    torch.manual_seed(0)
    return torch.randn(6, 8), torch.randn(4, 8), torch.randn(4, 12, 8), torch.randn(4, 8, 6)


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(seq_len=4), ValueError, "seq_len=4 must divide the number of tokens T=6"),
        (dict(seq_len=0), ValueError, r"seq_len=0 must be an int in \[1, inf\]"),
        (dict(seq_len=2.0), TypeError, "seq_len=2.0 must be an int"),
        (dict(seq_aux_loss_coeff="1"), TypeError, "seq_aux_loss_coeff='1' must be a finite number"),
        (
            dict(seq_aux_loss_coeff=0.1, router=RouterConfig(capacity_factor=1.0)),
            ValueError,
            "seq_aux_loss_coeff=0.1 needs dropless routing",
        ),
    ],
)
def test_bad_sequence_arguments_are_refused(kw, exc, match):
    x, gate, up, down = _args()
    router = kw.pop("router", None)
    with pytest.raises(exc, match=match):
        fused_moe(x, gate, up, down, router, backend="torch", **kw)
