"""Expert weight gradients added into an existing ``.grad`` inside the triton backward (no fresh
``[E, ., .]`` tensor), and returned to autograd wherever that would not give autograd's result.

On CPU under the Triton interpreter (fp32); with a GPU, on it. Reference: the torch backend, whose
gradients autograd accumulates.
"""

import contextlib
import copy
import importlib
from unittest import mock

import pytest
import torch

from flashfusemoe.backends import torch as ref
from flashfusemoe.backends.triton import experts as tri_experts
from flashfusemoe.backends.triton import grouped_gemm
from flashfusemoe.backends.triton.tma_gemm import tma_layout_ok
from tests.strategies import Problem, randn, topk_ids

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = dict(rtol=1e-4, atol=1e-4)
EXPERTS_MODULE = importlib.import_module("flashfusemoe.backends.triton.experts")  # not the function
P = Problem(T=9, D=8, E=3, K=2, I=4, W=1, skew="uniform", seed=5)


def _leaves():
    """x, routing weights, w_up, w_down (fresh leaves) and what the routing needs."""
    ids = topk_ids(P).to(DEV)
    x = randn(P, P.T, P.D).to(DEV).requires_grad_()
    w = torch.rand(P.T, P.K, generator=P.gen(7)).to(DEV).requires_grad_()
    up = randn(P, P.E, 2 * P.I, P.D, salt=1).to(DEV).requires_grad_()
    down = randn(P, P.E, P.D, P.I, salt=2).to(DEV).requires_grad_()
    return ids, [x, w, up, down]


def _clones(leaves, grads=None):
    out = [t.detach().clone().requires_grad_() for t in leaves]
    for t, g in zip(out, grads or [None] * len(out), strict=True):
        t.grad = None if g is None else g.clone()
    return out


def _run(fn, ids, leaves, backward):
    x, w, up, down = leaves
    out = fn(x, ids, w, up, down, "swiglu")
    cot = randn(P, P.T, P.D, salt=3).to(DEV)
    return backward((out * cot).sum(), leaves)


def _spy():
    """Records, per weight-gradient GEMM, whether it was handed a buffer to add into."""
    seen = []
    real = EXPERTS_MODULE._wgrad

    def wgrad(a, b, offs, acc):
        seen.append(acc is not None)
        return real(a, b, offs, acc)

    return seen, mock.patch.object(EXPERTS_MODULE, "_wgrad", wgrad)


@pytest.mark.parametrize("tma", [False, True])
def test_triton_weight_grads_added_into_existing_grad(tma):
    """Gradient accumulation: every leaf already has a ``.grad``; the expert weights' gradients go
    into those buffers in place (both GEMMs), and all gradients equal autograd's accumulation."""
    ids, leaves = _leaves()
    grads = [torch.randn_like(t) for t in leaves]
    got = _clones(leaves, grads)
    buffers = [t.grad for t in got]
    seen, spy = _spy()
    # with ``tma`` on CPU the TMA kernels run wherever their layout rules hold, as on Hopper
    on_tma = mock.patch.object(grouped_gemm, "tma_ok", lambda *ts: all(map(tma_layout_ok, ts)))
    with spy, on_tma if tma and DEV.type == "cpu" else contextlib.nullcontext():
        _run(tri_experts, ids, got, lambda loss, _: loss.backward())
    assert seen == [True, True]
    assert all(t.grad is b for t, b in zip(got, buffers, strict=True))  # same buffers, updated
    want = _clones(leaves, grads)
    _run(ref.experts, ids, want, lambda loss, _: loss.backward())
    for g, w_ in zip(got, want, strict=True):
        torch.testing.assert_close(g.grad, w_.grad, **TOL)


@pytest.mark.filterwarnings("ignore:grad and param do not obey the gradient layout contract")
@pytest.mark.parametrize(
    "case", ["no_grad_yet", "autograd_grad", "backward_inputs", "tensor_hook", "strided_grad"]
)
def test_triton_weight_grads_returned_where_autograd_would_not_add_in_place(case):
    """Where in-place addition would not be what autograd does, the gradient goes back to autograd:
    no ``.grad`` yet, ``autograd.grad``, ``backward(inputs=...)`` without the weights, a tensor hook
    on a weight (it must see the gradient; the other weight still goes in place), a non-contiguous
    ``.grad``. Gradients equal the reference's, and ``.grad`` buffers autograd leaves alone stay
    (``create_graph=True`` is refused: tests/test_layer.py)."""
    ids, leaves = _leaves()
    grads = None if case == "no_grad_yet" else [torch.randn_like(t) for t in leaves]
    if case == "strided_grad":
        grads = [g.mT.contiguous().mT if g.dim() == 3 else g for g in grads]
    backward = {
        "autograd_grad": lambda loss, ts: torch.autograd.grad(loss, ts),
        "backward_inputs": lambda loss, ts: loss.backward(inputs=[ts[0]]),
    }.get(case, lambda loss, _: loss.backward())
    results = []
    for fn in (tri_experts, ref.experts):
        run = _clones(leaves, grads)
        hooked = []
        if case == "tensor_hook":
            run[2].register_hook(lambda g, hooked=hooked: hooked.append(g is not None))
        seen, spy = _spy()
        with spy:
            returned = _run(fn, ids, run, backward)
        if fn is tri_experts:  # w_down's GEMM runs first; only the hooked w_up must go back
            assert seen == ([True, False] if case == "tensor_hook" else [False, False])
        if case == "tensor_hook":
            assert hooked == [True]
        results.append([t.grad for t in run] + list(returned or []))
    if grads is not None and case in ("autograd_grad", "backward_inputs"):
        untouched = results[0][2:4] if case == "backward_inputs" else results[0][:4]
        for g, g0 in zip(untouched, grads[2:4] if case == "backward_inputs" else grads, strict=True):
            assert torch.equal(g, g0)
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_triton_in_place_grads_seen_by_post_accumulate_hooks_and_shared_weights():
    """A weight used by two layer calls in one graph gets both gradients added; post-accumulate-grad
    hooks (what DDP-style reducers use) run after the buffer holds them."""
    ids, leaves = _leaves()
    grads = [torch.randn_like(t) for t in leaves]
    results = []
    for fn in (tri_experts, ref.experts):
        x, w, up, down = _clones(leaves, grads)
        after_hook = []
        up.register_post_accumulate_grad_hook(lambda p, seen=after_hook: seen.append(p.grad.clone()))
        cot = randn(P, P.T, P.D, salt=4).to(DEV)
        out = fn(x, ids, w, up, down, "swiglu") + fn(x * 2, ids, w, up, down, "swiglu") * cot
        out.sum().backward()
        assert len(after_hook) == 1
        assert torch.equal(after_hook[0], up.grad)
        results.append([x.grad, w.grad, up.grad, down.grad])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("reentrant", [False, True])
def test_triton_in_place_grads_under_activation_checkpointing(reentrant):
    """torch.utils.checkpoint around the experts with gradient buffers already there: the recomputed
    graph's backward (nested, with reentrant checkpointing) adds into the same buffers, once."""
    ids, leaves = _leaves()
    grads = [torch.randn_like(t) for t in leaves]
    results = []
    for fn in (tri_experts, ref.experts):
        x, w, up, down = _clones(leaves, grads)
        layer = lambda x, fn=fn, w=w, up=up, down=down: fn(x, ids, w, up, down, "swiglu")  # noqa: E731
        out = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=reentrant)
        seen, spy = _spy()
        with spy:
            (out * randn(P, P.T, P.D, salt=3).to(DEV)).sum().backward()
        if fn is tri_experts:
            assert seen == [True, True]
        results.append([x.grad, w.grad, up.grad, down.grad])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("bucket_view", [False, True])
def test_triton_in_place_grads_under_ddp_gradient_accumulation(bucket_view):
    """DDP (gloo on CPU, NCCL on GPU; one rank) around the layer: a ``no_sync`` micro-batch creates
    the gradients, the next one adds into them in place (DDP's own buffers with
    ``gradient_as_bucket_view``) and DDP's reducer, whose hooks run after AccumulateGrad, still syncs
    them: every gradient equals the torch layer's over the same two micro-batches."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from flashfusemoe import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(8, 8, 3, 2, backend="torch").to(DEV)
    xs = [randn(P, P.T, 8, salt=s).to(DEV) for s in (1, 2)]
    pg = "nccl" if DEV.type == "cuda" else "gloo"
    dist.init_process_group(pg, store=dist.HashStore(), rank=0, world_size=1)
    try:
        tri = copy.deepcopy(layer)
        tri.backend = "triton"
        ddp = DDP(tri, gradient_as_bucket_view=bucket_view)
        with ddp.no_sync():
            ddp(xs[0])[0].sum().backward()
        seen, spy = _spy()
        with spy:
            ddp(xs[1])[0].sum().backward()
        assert seen == [True, True]
    finally:
        dist.destroy_process_group()
    for x in xs:
        layer(x)[0].sum().backward()
    for (name, got), want in zip(tri.named_parameters(), layer.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")
