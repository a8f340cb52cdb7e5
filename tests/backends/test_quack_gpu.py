"""The triton backend's experts on QuACK's GEMMs (``FLASHFUSEMOE_GEMM=quack``: all six; ``quack-wgrad``: the
two weight gradients inside the triton path), where QuACK imports and a Hopper GPU runs it: within the
tolerance rule of the fp32 reference (output, x, routing weights, both expert weights; fresh and
accumulated gradients), dropped slots and empty experts, recompute bit for bit.
The layer-level GPU tests (compile, CUDA graphs) take this path too wherever it loads (``auto``).
The refusals, the auto rule and the routing-weight kernels run everywhere (CPU: Triton's interpreter)."""

import pytest
import torch

from flashfusemoe.backends.torch.experts import experts as reference_experts
from flashfusemoe.backends.triton import quack_gemm
from flashfusemoe.backends.triton.experts import experts

BF16_EPS = 2.0**-8


needs_quack = pytest.mark.skipif(not quack_gemm.runs_here(), reason="QuACK does not run here")


def _inputs(T, D, I, E, K, routing, seed, glu=True):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.rand(T, E, device="cuda", generator=g).topk(K, dim=1).indices
    if routing == "empty":  # half the experts get no token
        ids = torch.rand(T, E, device="cuda", generator=g)[:, : max(K, E // 2)].topk(K, dim=1).indices
    if routing == "dropped":  # under EP: slots whose expert is elsewhere
        ids = torch.where(torch.rand(T, K, device="cuda", generator=g) < 0.3, -1, ids)
    x = torch.randn(T, D, device="cuda", generator=g)
    weights = torch.rand(T, K, device="cuda", generator=g)
    w_up = torch.randn(E, 2 * I if glu else I, D, device="cuda", generator=g) / D**0.5
    w_down = torch.randn(E, D, I, device="cuda", generator=g) / I**0.5
    cot = torch.randn(T, D, device="cuda", generator=g)
    return ids, [x, weights, w_up, w_down], cot


def _run(fn, ids, leaves, cot, dtype, existing=None, activation="swiglu", **kw):
    """Output and the gradients of x, weights, w_up, w_down (fp32); ``existing``: starting ``.grad`` of
    the expert weights (accumulation)."""
    x, weights, w_up, w_down = (
        t.detach().to(dtype if i != 1 else torch.float32) for i, t in enumerate(leaves)
    )
    for t in (x, weights, w_up, w_down):
        t.requires_grad_()
    if existing is not None:
        w_up.grad, w_down.grad = (e.to(dtype).clone() for e in existing)
    out = fn(x, ids, weights, w_up, w_down, activation, **kw)
    (out.float() * cot).sum().backward()
    return [t.float() for t in (out, x.grad, weights.grad, w_up.grad, w_down.grad)]


@pytest.mark.gpu
@needs_quack
@pytest.mark.parametrize("routing", ["balanced", "empty", "dropped"])
@pytest.mark.parametrize(
    "shape", [(512, 256, 256, 8, 2), (333, 200, 88, 16, 4), (128, 64, 32, 4, 4)], ids=["small", "odd", "K=E"]
)
@pytest.mark.parametrize("grads", ["new", "existing"])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize(
    "gemms, activation", [("quack", "swiglu"), ("quack-wgrad", "swiglu"), ("quack-wgrad", "gelu")]
)
def test_quack_experts_within_tolerance_rule(
    monkeypatch, routing, shape, grads, recompute, gemms, activation
):
    monkeypatch.setenv("FLASHFUSEMOE_GEMM", gemms)
    glu = activation == "swiglu"
    ids, leaves, cot = _inputs(*shape, routing, seed=sum(shape), glu=glu)
    kept = int((ids >= 0).sum())
    existing = None
    if grads == "existing":
        existing = [torch.randn_like(leaves[2]), torch.randn_like(leaves[3])]
    ref32 = _run(reference_experts, ids, leaves, cot, torch.float32, existing, activation)
    ref16 = _run(reference_experts, ids, leaves, cot, torch.bfloat16, existing, activation)
    got = _run(
        experts, ids, leaves, cot, torch.bfloat16, existing, activation, recompute=recompute, num_slots=kept
    )
    for name, r32, r16, g in zip(["out", "x", "weights", "w_up", "w_down"], ref32, ref16, got, strict=True):
        floor = BF16_EPS * r32.abs().max().item()
        err16, err = (r16 - r32).abs().max().item(), (g - r32).abs().max().item()
        assert err <= 2 * err16 + floor, f"{name}: {gemms} {err:.3e} vs torch bf16 {err16:.3e}"


@pytest.mark.gpu
@needs_quack
def test_quack_recompute_is_bit_identical():
    """The recompute's h comes from the same tiles as the forward's: gradients equal bit for bit."""
    ids, leaves, cot = _inputs(512, 256, 256, 8, 2, "empty", seed=3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLASHFUSEMOE_GEMM", "quack")
        kept = _run(experts, ids, leaves, cot, torch.bfloat16)
        again = _run(experts, ids, leaves, cot, torch.bfloat16, recompute=True)
    for a, b in zip(kept, again, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@needs_quack
@pytest.mark.parametrize("gemms", ["quack", "quack-wgrad"])
def test_quack_experts_compile_fullgraph_bit_identical_to_eager(monkeypatch, gemms):
    """torch.compile (inductor, fullgraph) of the experts on QuACK's GEMMs: the ops are opaque, so the
    output and every gradient equal eager mode's bit for bit (what the fake implementations declare
    matches what the kernels write); new routing each step, no recompile."""
    import torch._dynamo

    monkeypatch.setenv("FLASHFUSEMOE_GEMM", gemms)
    torch._dynamo.reset()  # the other parametrization's graph of the same function (traced in its mode)
    compiled = torch.compile(experts, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):
            ids, leaves, cot = _inputs(333, 200, 88, 16, 4, "dropped", seed=seed)
            got = _run(compiled, ids, leaves, cot, torch.bfloat16, num_slots=333 * 4)
            ref = _run(experts, ids, leaves, cot, torch.bfloat16, num_slots=333 * 4)
            for name, g, r in zip(["out", "x", "weights", "w_up", "w_down"], got, ref, strict=True):
                assert torch.equal(g, r), f"step {seed} {name}: compiled differs from eager"


def test_quack_requested_where_it_cannot_run_is_refused(monkeypatch):
    """An explicit FLASHFUSEMOE_GEMM=quack or quack-wgrad that cannot run says why (here: CPU/fp32
    tensors, or fp16 on a GPU); the full path refuses an activation other than swiglu; an unknown value
    names the choices; ``triton`` and ``auto`` fall back to our kernels."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.randn(4, 16, device=dev, dtype=torch.float16 if dev.type == "cuda" else torch.float32)
    up, down = (
        torch.randn(2, 16, 16, device=dev, dtype=x.dtype),
        torch.randn(2, 16, 8, device=dev, dtype=x.dtype),
    )
    for mode in ("quack", "quack-wgrad"):
        monkeypatch.setenv("FLASHFUSEMOE_GEMM", mode)
        with pytest.raises(RuntimeError, match=f"FLASHFUSEMOE_GEMM={mode}, .*bf16 CUDA"):
            quack_gemm.plan(x, up, down, "swiglu", 8)
    monkeypatch.setenv("FLASHFUSEMOE_GEMM", "quack")
    with pytest.raises(RuntimeError, match="FLASHFUSEMOE_GEMM=quack, .*activation 'gelu'"):
        quack_gemm.plan(x, up[:, :8], down, "gelu", 8)
    monkeypatch.setenv("FLASHFUSEMOE_GEMM", "cutlass")
    with pytest.raises(ValueError, match="FLASHFUSEMOE_GEMM='cutlass' is not one of"):
        quack_gemm.plan(x, up, down, "swiglu", 8)
    for mode in ("triton", "auto"):  # (auto: fp16 or CPU tensors do not qualify)
        monkeypatch.setenv("FLASHFUSEMOE_GEMM", mode)
        assert quack_gemm.plan(x, up, down, "swiglu", 8) == "triton"


@pytest.mark.parametrize(
    "shape, gemms, traced",
    [
        ((16384, 2048, 768, 128, 8), "quack", False),  # fine-grained: 8.50 vs 9.00 ms (H100)
        ((16384, 2048, 1024, 64, 8), "quack", False),  # OLMoE-like: 9.81 vs 10.55
        ((8192, 1024, 2048, 8, 2), "triton", False),  # seed-like: host-bound eager, 2.97 vs 2.54
        ((8192, 1024, 2048, 8, 2), "quack", True),  # compiled in the seed-1b LM: 58.7 vs 60.5 a step
        ((2048, 1024, 2048, 8, 2), "triton", True),  # below the smallest layer measured compiled
        ((32768, 4096, 1024, 128, 8), "quack", False),  # SonicMoE's default: faster op by op
        ((8192, 4096, 14336, 8, 2), "quack-wgrad", False),  # Mixtral-like: only the weight gradients faster
        ((512, 8192, 8192, 8, 2), "triton", False),  # too small to pay QuACK's host path
    ],
)
def test_quack_auto_takes_the_shapes_where_it_measured_faster(shape, gemms, traced):
    T, D, I, E, K = shape
    assert quack_gemm.measured_choice(T * K, D, I, traced) == gemms


def test_auto_takes_the_traced_floor_while_torch_compile_traces(monkeypatch):
    """``plan`` asks ``measured_choice`` with ``traced`` = whether torch.compile is tracing (QuACK's
    availability stubbed: the rule alone; meta tensors: shapes only)."""
    monkeypatch.setenv("FLASHFUSEMOE_GEMM", "auto")
    monkeypatch.setattr(quack_gemm, "_why_not", lambda *args: None)
    x, up, down = (
        torch.empty(shape, device="meta") for shape in ((8192, 1024), (8, 4096, 1024), (8, 1024, 2048))
    )
    assert quack_gemm.plan(x, up, down, "swiglu", 8192 * 2) == "triton"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert quack_gemm.plan(x, up, down, "swiglu", 8192 * 2) == "quack"


def test_routing_weights_move_between_slots_and_rows():
    """Row r's weight is its slot's; the gradients go back to slot order; rows past the live count
    (their slot ids unset: garbage here) are neither read nor written."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    S, live = 12, 9
    row_slot = torch.cat([torch.randperm(S)[:live], torch.full((3,), 10**6)]).int().to(dev)
    w_S = torch.rand(S, device=dev)
    got = quack_gemm.rows_from_slots(w_S, row_slot, torch.tensor([live], dtype=torch.int32, device=dev))
    assert torch.equal(got[:live], w_S[row_slot[:live].long()]) and not got[live:].any()
    g_N = torch.rand(S, device=dev)
    back = quack_gemm.slots_from_rows(g_N, row_slot, torch.tensor([live], dtype=torch.int32, device=dev), S)
    expect = torch.zeros(S, device=dev).index_put_((row_slot[:live].long(),), g_N[:live])
    assert torch.equal(back, expect)
