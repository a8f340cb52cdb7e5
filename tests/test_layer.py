"""MoELayer / fused_moe: semantics, EP sharding on simulated ranks, and argument errors."""

import copy
import math
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flashfusemoe.overlap
from flashfusemoe import (
    MoELayer,
    RouterConfig,
    fused_moe,
    router_logits,
    update_expert_bias,
)
from flashfusemoe.backends import available_backends, get_backend
from flashfusemoe.backends.torch import dense_experts, expert_mlp, route
from flashfusemoe.comm import FakeCommunicator, FakeWorld, LoopbackCommunicator
from tests.strategies import ep_problems, problems, randn, rank_tokens, skew_bias

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _layer(p, activation="swiglu", shared=1, **kw):
    torch.manual_seed(p.seed % 1000)
    F_ = 2 * p.I if activation in ("swiglu", "geglu") else p.I
    top_k = None if "router" in kw else p.K
    layer = MoELayer(
        max(p.D, 1), F_, p.E, top_k, activation, num_shared_experts=shared, use_expert_bias=True, **kw
    )
    layer.expert_bias.copy_(skew_bias(p))
    return layer


def check_ep_layer_equals_unsharded(
    p, activation="swiglu", backend=None, sync_free=False, drop=False, latent_dim=None
):
    """Output, losses, counts and every gradient (x, router, w_up, w_down, shared experts, latent
    projections) of the EP layer on W simulated ranks equal the unsharded layer's on the same global
    tokens; the routing goes through the expert bias (the problem's skew) and, with ``drop``, a
    capacity limit."""
    router = RouterConfig(top_k=p.K, capacity_factor=0.7 if drop else None)
    ref = _layer(p, activation, router=router, aux_loss_coeff=0.1, z_loss_coeff=0.01, latent_dim=latent_dim)
    ref.backend = backend
    T_r = [p.T if sync_free else rank_tokens(p, r) for r in range(p.W)]
    xs = [randn(p, T, p.D, salt=r).requires_grad_() for r, T in enumerate(T_r)]
    cots = [randn(p, *x.shape, salt=50 + r) for r, x in enumerate(xs)]
    if drop:  # capacity counts a rank's own tokens: the unsharded reference runs rank by rank
        refs = [ref(x) for x in xs]
        ref_out = torch.cat([o for o, _ in refs])
        aux = sum(loss["aux_loss"] + loss["z_loss"] for _, loss in refs)
    else:
        ref_out, loss = ref(torch.cat(xs))
        aux = 0.0
    ((ref_out * torch.cat(cots)).sum() + aux).backward()
    world = FakeWorld(p.W)

    def rank_fn(rank):
        layer = copy.deepcopy(ref)
        layer.zero_grad(set_to_none=True)
        layer.shard_experts(world.group(rank), FakeCommunicator(world.group(rank), sync_free=sync_free))
        x = xs[rank].detach().clone().requires_grad_()
        out, losses = layer(x)
        ((out * cots[rank]).sum() + (losses["aux_loss"] + losses["z_loss"] if drop else 0.0)).backward()
        return out, x.grad, layer

    results = world.run(rank_fn)
    e, start = p.E // p.W, 0
    tol = dict(rtol=1e-5, atol=1e-5)
    for rank, (out, gx, layer) in enumerate(results):
        n = xs[rank].shape[0]
        torch.testing.assert_close(out, ref_out[start : start + n], **tol)
        torch.testing.assert_close(gx, xs[rank].grad, **tol)
        for name in ("w_up", "w_down"):
            ref_grad = getattr(ref, name).grad[rank * e : (rank + 1) * e]
            torch.testing.assert_close(getattr(layer, name).grad, ref_grad, **tol)
        start += n
    replicated = ["gate_weight", "shared_w_up", "shared_w_down"] + ["latent_down", "latent_up"] * bool(
        latent_dim
    )
    for name in replicated:  # replicated: the ranks' shares sum up
        total = sum(getattr(layer, name).grad for _, _, layer in results)
        want = getattr(ref, name).grad
        # W partial sums added in another order: fp32 rounding scales with the largest entry, not each one
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-5 * scale)


@given(ep_problems(), st.sampled_from(["swiglu", "relu2", "gelu"]), st.booleans(), st.booleans())
def test_fake_ep_layer_equals_unsharded(p, activation, sync_free, drop):
    check_ep_layer_equals_unsharded(p, activation, sync_free=sync_free, drop=drop)


@given(ep_problems(max_local=4).filter(lambda p: p.D >= 2), st.integers(1, 11), st.booleans())
def test_fake_ep_latent_layer_equals_unsharded(p, latent, sync_free):
    check_ep_layer_equals_unsharded(p, sync_free=sync_free, latent_dim=min(latent, p.D - 1))


@given(ep_problems(max_local=3), st.booleans(), st.booleans())
def test_fake_ep_overlapped_schedule_equals_serial_bit_for_bit(p, latent, sync_free):
    """Shared experts launched before the dispatch (overlap) vs after the combine (serial): the same
    output and gradients, bit for bit. (On CPU the order changes but no streams run; the CUDA-stream
    schedule is checked by integration/ep_check.py on GPU.)"""
    ref = _layer(p, "swiglu", latent_dim=1 if latent and p.D >= 2 else None)
    world = FakeWorld(p.W)
    T_r = [p.T if sync_free else rank_tokens(p, r) for r in range(p.W)]
    xs = [randn(p, T, p.D, salt=r) for r, T in enumerate(T_r)]

    def rank_fn(rank):
        runs = []
        for overlap in (True, False):
            layer = copy.deepcopy(ref)
            layer.overlap = overlap
            layer.shard_experts(world.group(rank), FakeCommunicator(world.group(rank), sync_free=sync_free))
            x = xs[rank].clone().requires_grad_()
            out, _ = layer(x)
            (out * out.detach().sin()).sum().backward()
            runs.append([out, x.grad] + [q.grad for q in layer.parameters()])
        return runs

    begin = flashfusemoe.overlap.begin
    with mock.patch.object(flashfusemoe.overlap, "begin", side_effect=begin) as spy:
        results = world.run(rank_fn)
    assert spy.call_count == (p.W if p.W > 1 else 0)  # the overlapped order ran, once per rank
    for overlapped, serial in results:
        assert all(torch.equal(a, b) for a, b in zip(overlapped, serial, strict=True))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_latent_layer_equals_plain_torch_projections(backend):
    """down-projection -> the dense expert formulation -> up-projection, + shared experts on x."""
    torch.manual_seed(8)
    layer = MoELayer(12, 10, 4, 2, num_shared_experts=1, latent_dim=5, backend=backend).to(DEV)
    assert layer.w_up.shape == (4, 10, 5) and layer.w_down.shape == (4, 5, 5)
    assert layer.latent_down.shape == (5, 12) and layer.latent_up.shape == (12, 5)
    x0 = torch.randn(9, 12, device=DEV)
    results = []
    for plain in (False, True):
        x = x0.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        if plain:
            r = route(router_logits(x, layer.gate_weight), layer.router_config)
            h = x @ layer.latent_down.t()
            y = dense_experts(h, r.topk_ids_TK, r.topk_weights_TK, layer.w_up, layer.w_down, "swiglu")
            out = y @ layer.latent_up.t() + expert_mlp(x, layer.shared_w_up, layer.shared_w_down, "swiglu")
        else:
            out, _ = layer(x)
        (out * torch.arange(out.numel(), device=DEV).view(out.shape).sin()).sum().backward()
        results.append([out, x.grad] + [q.grad for q in layer.parameters()])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_loopback_layer_is_the_single_device_computation_bit_for_bit(backend):
    """fused_moe through loopback equals route + the backend's experts called directly (the
    single-GPU computation), output and every gradient, bit for bit (on the GPU where there is one)."""
    torch.manual_seed(4)
    layer = MoELayer(8, 12, 6, 3, num_shared_experts=1, aux_loss_coeff=0.1, backend=backend).to(DEV)
    assert isinstance(layer.communicator, LoopbackCommunicator)
    be = get_backend(backend, DEV)
    x0 = torch.randn(40, 8, device=DEV)
    results = []
    for direct in (False, True):
        x = x0.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        if direct:
            r = be.route(be.router_logits(x, layer.gate_weight), layer.router_config)
            out = be.experts(x, r.topk_ids_TK, r.topk_weights_TK, layer.w_up, layer.w_down, "swiglu")
            out = out + be.expert_mlp(x, layer.shared_w_up, layer.shared_w_down, "swiglu")
            aux = 0.1 * r.load_balance_loss
        else:
            out, losses = layer(x)
            aux = losses["aux_loss"]
        (out.square().sum() + aux).backward()
        results.append([out, x.grad] + [q.grad for q in layer.parameters()])
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)


def test_shard_experts_keeps_parameter_objects_flags_and_grads():
    torch.manual_seed(5)
    layer = MoELayer(4, 8, 4, 1)
    layer.w_down.requires_grad_(False)  # frozen experts stay frozen
    layer(torch.randn(6, 4))[0].sum().backward()
    up, down, up_grad = layer.w_up, layer.w_down, layer.w_up.grad.clone()
    full_up, full_down = up.detach().clone(), down.detach().clone()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    world = FakeWorld(2)
    layer.shard_experts(world.group(1))
    assert layer.w_up is up and layer.w_down is down
    assert up.requires_grad and not down.requires_grad
    assert torch.equal(up, full_up[2:]) and torch.equal(down, full_down[2:])
    assert torch.equal(up.grad, up_grad[2:])
    assert any(q is up for g in optimizer.param_groups for q in g["params"])
    assert layer.expert_parameters() == [up, down]
    with pytest.raises(RuntimeError, match="shard_experts was already called"):
        layer.shard_experts(world.group(1))


def test_shard_experts_refuses_groups_and_communicators_that_do_not_fit(monkeypatch):
    world = FakeWorld(2)
    with pytest.raises(ValueError, match="LoopbackCommunicator spans 1 rank.* EP group has 2"):
        MoELayer(4, 8, 4, 1).shard_experts(world.group(0), communicator="loopback")
    monkeypatch.setenv("FLASHFUSEMOE_COMM", "loopback")
    with pytest.raises(ValueError, match="spans 1 rank"):
        MoELayer(4, 8, 4, 1).shard_experts(world.group(0))
    with pytest.raises(
        TypeError, match="ep_group must be a torch.distributed ProcessGroup, a FakeGroup or None"
    ):
        MoELayer(4, 8, 4, 1).shard_experts("not a group")
    other = FakeWorld(4)
    with pytest.raises(ValueError, match="FakeCommunicator spans 4 rank.* EP group has 2"):
        MoELayer(4, 8, 4, 1).shard_experts(world.group(0), communicator=FakeCommunicator(other.group(0)))


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="fake moves CPU tensors, which the triton backend runs only under the CPU interpreter (CI); "
    "with a GPU, tests/comm/test_ep_gpu.py runs the triton backend over gloo on CUDA tensors",
)
def test_fake_ep_layer_on_the_triton_backend():
    """The interpreter runs one rank at a time (FakeWorld serializes ranks): no thread races."""
    from tests.strategies import Problem

    for seed in range(2):  # with and without the sync-free dispatch
        p = Problem(T=13, D=6, E=8, K=3, I=4, W=4, skew="few_experts", seed=seed)
        check_ep_layer_equals_unsharded(p, backend="triton", sync_free=seed == 1)


@given(problems(max_world=1, allow_empty=False), st.sampled_from(["softmax", "sigmoid"]), st.booleans())
def test_layer_equals_dense_formulation(p, score_func, renormalize):
    layer = _layer(p, shared=0, router=RouterConfig(p.K, score_func, renormalize))
    x = randn(p, p.T, p.D)
    out, losses = layer(x)
    r = route(router_logits(x, layer.gate_weight), layer.router_config, layer.expert_bias)
    ref = dense_experts(x, r.topk_ids_TK, r.topk_weights_TK, layer.w_up, layer.w_down, "swiglu")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(losses["tokens_per_expert"], torch.bincount(r.topk_ids_TK.reshape(-1), minlength=p.E))
    assert int(losses["tokens_per_expert"].sum()) == p.T * p.K


def test_shared_experts_are_added():
    torch.manual_seed(0)
    layer = MoELayer(8, 12, 4, 2, num_shared_experts=2)
    assert layer.shared_w_up.shape == (24, 8) and layer.shared_w_down.shape == (8, 12)
    x = torch.randn(5, 8)
    out, _ = layer(x)
    routed, _ = fused_moe(x, layer.gate_weight, layer.w_up, layer.w_down, RouterConfig(top_k=2))
    torch.testing.assert_close(out, routed + expert_mlp(x, layer.shared_w_up, layer.shared_w_down, "swiglu"))


@pytest.mark.parametrize("backend", available_backends())
def test_recompute_keeps_no_shared_expert_activations_and_same_gradients(backend):
    """recompute_activations=True recomputes the routed and the shared experts, "routed" / "shared" only
    those: the wide [T, S*F] / [T, S*I] shared tensors are saved exactly where the shared experts keep
    theirs, what each choice drops adds up to what True drops, and the output and every gradient are
    bit-identical to keeping everything."""
    T, D, F_, S = 7, 8, 12, 2
    modes = (False, True, "routed", "shared")
    results, shapes = [], []
    for recompute in modes:
        torch.manual_seed(0)
        layer = MoELayer(
            D, F_, 4, 2, num_shared_experts=S, recompute_activations=recompute, backend=backend, device=DEV
        )
        x = torch.randn(T, D, device=DEV, requires_grad=True)
        saved = []

        def pack(t, saved=saved):
            saved.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out, _ = layer(x)
        out.square().sum().backward()
        results.append([out.detach(), x.grad, *(p.grad for p in layer.parameters())])
        shapes.append(saved)
    wide = {(T, S * F_), (T, S * F_ // 2)}
    assert [bool(wide & set(s)) for s in shapes] == [True, False, True, False]
    elems = {m: sum(math.prod(shape) for shape in s) for m, s in zip(modes, shapes, strict=True)}
    assert elems[False] > elems["routed"] > elems[True] and elems[False] > elems["shared"] > elems[True]
    assert elems[False] - elems["routed"] + elems[False] - elems["shared"] == elems[False] - elems[True]
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def test_losses_are_weighted_and_backprop():
    torch.manual_seed(1)
    layer = MoELayer(8, 8, 4, 2, aux_loss_coeff=0.5, z_loss_coeff=0.25)
    x = torch.randn(6, 8)
    _, losses = layer(x)
    r = route(router_logits(x, layer.gate_weight), layer.router_config)
    torch.testing.assert_close(losses["aux_loss"], 0.5 * r.load_balance_loss)
    torch.testing.assert_close(losses["z_loss"], 0.25 * r.z_loss)
    (losses["aux_loss"] + losses["z_loss"]).backward()
    assert layer.gate_weight.grad.abs().sum() > 0
    assert not losses["tokens_per_expert"].requires_grad


def test_capacity_factor_drops_and_counts():
    torch.manual_seed(2)
    layer = MoELayer(4, 8, 2, router=RouterConfig(top_k=1, capacity_factor=0.5), use_expert_bias=True)
    layer.expert_bias[0] = 100.0  # everything to expert 0; capacity ceil(0.5*8/2) = 2
    x = torch.randn(8, 4)
    out, losses = layer(x)
    assert losses["dropped_slots"].item() == 6
    assert (out[2:] == 0).all() and (out[:2] != 0).any()


def test_batched_input_shape_and_t0():
    layer = MoELayer(6, 8, 3, 3)
    out, losses = layer(torch.randn(2, 3, 6))
    assert out.shape == (2, 3, 6)
    empty = torch.randn(0, 6, requires_grad=True)
    out, losses = layer(empty)
    out.sum().backward()
    assert out.shape == (0, 6) and empty.grad.shape == (0, 6)
    assert losses["tokens_per_expert"].tolist() == [0, 0, 0]


def test_expert_bias_update_rule():
    bias = torch.zeros(4)
    new = update_expert_bias(bias, torch.tensor([10, 2, 4, 4]), rate=0.1)
    torch.testing.assert_close(new, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    assert torch.equal(bias, torch.zeros(4))
    layer = MoELayer(4, 8, 4, 1, use_expert_bias=True)
    layer.update_expert_bias(torch.tensor([10, 2, 4, 4]), rate=0.1)
    torch.testing.assert_close(layer.expert_bias, new)
    with pytest.raises(RuntimeError, match="use_expert_bias=False"):
        MoELayer(4, 8, 4, 1).update_expert_bias(torch.ones(4))


def test_forward_does_not_modify_inputs():
    layer = MoELayer(8, 8, 4, 2, num_shared_experts=1)
    x = torch.randn(5, 8)
    before = [t.clone() for t in (x, *layer.parameters())]
    layer(x)
    assert all(torch.equal(a, b) for a, b in zip(before, (x, *layer.parameters()), strict=True))


def test_bf16_close_to_fp32_reference():
    """bf16 layer vs the fp32 layer on the same (bf16-representable) inputs and weights."""
    torch.manual_seed(3)
    layer = MoELayer(32, 64, 4, 2).to(torch.bfloat16)
    x = torch.randn(40, 32).to(torch.bfloat16)
    out, _ = layer(x)
    ref, _ = copy.deepcopy(layer).float()(x.float())
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


# ---------------------------------------------------------------- selection, import, main job


def test_backend_selection(monkeypatch):
    monkeypatch.setenv("FLASHFUSEMOE_BACKEND", "torch")
    assert get_backend().NAME == "torch"
    monkeypatch.setenv("FLASHFUSEMOE_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend='nope' is unknown"):
        get_backend()
    monkeypatch.delenv("FLASHFUSEMOE_BACKEND")
    assert get_backend(device="cpu").NAME == "torch"
    assert "torch" in available_backends()


def test_layer_reads_the_backend_environment_once(monkeypatch):
    monkeypatch.delenv("FLASHFUSEMOE_BACKEND", raising=False)
    torch.manual_seed(0)
    auto = MoELayer(4, 8, 2, 1)
    monkeypatch.setenv("FLASHFUSEMOE_BACKEND", "torch")
    torch.manual_seed(0)
    pinned = MoELayer(4, 8, 2, 1)
    monkeypatch.setenv("FLASHFUSEMOE_BACKEND", "nope")  # read at construction only: later layers fail
    assert (auto.backend, pinned.backend) == ("auto", "torch")
    x = torch.randn(3, 4)
    torch.testing.assert_close(auto(x)[0], pinned(x)[0])
    with pytest.raises(ValueError, match="backend='nope' is unknown"):
        MoELayer(4, 8, 2, 1)


def test_a_torch_layer_never_needs_triton(monkeypatch):
    """With Triton broken (any error at import), torch and auto layers build and run; a triton layer
    says why it cannot, at construction."""
    import importlib

    from flashfusemoe.backends import registry

    real = importlib.import_module

    def broken(name, *args):
        if name == "flashfusemoe.backends.triton":
            raise RuntimeError("triton is broken here")
        return real(name, *args)

    monkeypatch.setattr(registry, "_LOADED", {})
    monkeypatch.setattr(registry.importlib, "import_module", broken)
    x = torch.randn(3, 4)
    for backend in ("torch", None):
        MoELayer(4, 8, 2, 1, backend=backend)(x)
    with pytest.raises(
        RuntimeError, match="backend='triton' cannot be loaded: cannot import: RuntimeError: triton"
    ):
        MoELayer(4, 8, 2, 1, backend="triton")


def test_setting_the_backend_later_resolves_and_imports_it_then(monkeypatch):
    """``layer.backend = name`` after construction imports that backend at once (an import inside a
    ``torch.compile(fullgraph=True)`` forward is a graph break), resolves the environment then, and
    refuses an unknown name as the constructor does."""
    from flashfusemoe.backends import registry

    monkeypatch.setattr(registry, "_LOADED", {})
    layer = MoELayer(4, 8, 2, 1, backend="torch")
    assert list(registry._LOADED) == ["torch"]
    layer.backend = "triton"
    assert layer.backend == "triton" and "triton" in registry._LOADED
    monkeypatch.setenv("FLASHFUSEMOE_BACKEND", "torch")
    layer.backend = None
    assert layer.backend == "torch"
    with pytest.raises(ValueError, match="backend='garbage' is unknown"):
        layer.backend = "garbage"
    assert layer.backend == "torch"


def test_import_is_silent_and_reads_no_environment():
    code = (
        "import os, torch\n"
        "seen = []\n"
        "class Spy(type(os.environ)):\n"
        "    def __getitem__(self, key):\n"
        "        if str(key).startswith('FLASHFUSEMOE'): seen.append(key)\n"
        "        return super().__getitem__(key)\n"
        "os.environ.__class__ = Spy\n"
        "import sys, flashfusemoe, flashfusemoe.comm, flashfusemoe.backends\n"
        "assert not seen, seen\n"
        "assert 'deep_ep' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    env = dict(os.environ, FLASHFUSEMOE_BACKEND="bogus", FLASHFUSEMOE_COMM="bogus")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""


def test_main_job_runs_and_checks():
    proc = subprocess.run(
        [sys.executable, "-m", "flashfusemoe", "--tokens", "64", "--iters", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "check vs the dense fp32 formulation" in proc.stdout and "tokens per expert" in proc.stdout
    for name in ("out", "x.grad", "gate_weight.grad", "w_up.grad", "w_down.grad"):
        assert f"  {name} " in proc.stdout


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--iters", "0"], "argument --iters: must be >= 1, got 0"),
        (["--iters", "-1"], "argument --iters: must be >= 1, got -1"),
        (["--top-k", "9"], "--top-k 9 must be <= --experts 8"),
        (["--activation", "tanh"], "argument --activation: invalid choice"),
    ],
)
def test_main_job_refuses_bad_options(flags, message, capsys):
    from flashfusemoe.__main__ import main  # in process: `python -m flashfusemoe` runs in the test above

    with pytest.raises(SystemExit) as exit_:
        main(flags)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err, err


def test_main_job_check_fails_on_a_wrong_gradient(monkeypatch, capsys):
    """The check is not vacuous: a backend whose w_up gradient is off by 1% fails it."""
    import flashfusemoe.__main__ as main_job

    real = main_job._dense_reference

    def skewed(*args):
        ref = real(*args)
        ref["w_up.grad"] = ref["w_up.grad"] * 1.01
        return ref

    monkeypatch.setattr(main_job, "_dense_reference", skewed)
    with pytest.raises(SystemExit, match="FAILED: w_up.grad differ"):
        main_job.main(["--tokens", "32", "--iters", "1", "--warmup", "1", "--device", "cpu"])
