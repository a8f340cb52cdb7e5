"""GPU-only checks of the triton backend: bf16/fp16 within the tolerance rule, fp32 against the reference,
torch.compile(fullgraph=True) without recompiles, CUDA-graph capture and replay (no host syncs).

Tolerance rule (STYLE.md): a kernel's error against an fp32 reference is at most 2x PyTorch's own
low-precision error (the torch backend in the same dtype) plus a floor of one rounding step of the
largest reference value.
"""

import copy

import pytest
import torch

from flashfusemoe import MoELayer
from flashfusemoe.backends.triton.grouped_gemm import grouped_mm, grouped_mm_act, grouped_mm_wgrad
from flashfusemoe.spec import activate
from tests.cuda_graphs import check_graph_replays_match_eager

pytestmark = pytest.mark.gpu

EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _layer(D, F, E, K, skew, dtype, **kw):
    torch.manual_seed(0)
    layer = MoELayer(
        D,
        F,
        E,
        K,
        num_shared_experts=1,
        use_expert_bias=True,
        aux_loss_coeff=1e-2,
        z_loss_coeff=1e-3,
        seq_aux_loss_coeff=1e-2,
        backend="torch",
        **kw,
    ).cuda()
    if skew:
        layer.expert_bias[: max(1, E // 8)] = 0.5  # hot experts take most slots; others go empty
    return layer.to(dtype)


def _run(layer, x, cot, backend, existing_grads=None):
    """Output and every gradient (fp32) of one forward+backward; with ``existing_grads`` (a dtype) each
    parameter starts with the same random ``.grad`` (values of that dtype), as under accumulation."""
    layer = copy.deepcopy(layer)
    layer.backend = backend
    if existing_grads is not None:
        gen = torch.Generator(device="cuda").manual_seed(7)
        for p in layer.parameters():
            p.grad = torch.randn(p.shape, device="cuda", generator=gen).to(existing_grads).to(p.dtype)
    x = x.detach().clone().requires_grad_()
    out, losses = layer(x)
    ((out.float() * cot).sum() + losses["aux_loss"] + losses["z_loss"] + losses["seq_aux_loss"]).backward()
    named = {"out": out, "x.grad": x.grad}
    named.update({n + ".grad": p.grad for n, p in layer.named_parameters()})
    return {k: v.float() for k, v in named.items()}, losses["tokens_per_expert"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("skew", [False, True], ids=["balanced", "skewed"])
@pytest.mark.parametrize(
    "shape",
    [(512, 256, 512, 8, 2), (384, 1000, 2800, 4, 2), (256, 128, 192, 16, 16), (200, 32, 40, 5, 2)],
    ids=["small", "odd-D1000-I1400", "K=E", "I20"],  # I20: unaligned GLU halves (a 4-stage tile overflowed)
)
@pytest.mark.parametrize("grads", ["new", "existing"])
def test_triton_low_precision_within_tolerance_rule(dtype, skew, shape, grads):
    """With ``existing`` gradient buffers the expert weights' gradients are added into them in the
    weight-gradient GEMM (one rounding); autograd adds a rounded gradient (two)."""
    T, D, F, E, K = shape
    low = _layer(D, F, E, K, skew, dtype)
    x = torch.randn(T, D, device="cuda").to(dtype)
    cot = torch.randn(T, D, device="cuda")
    existing = dtype if grads == "existing" else None
    ref32, counts = _run(copy.deepcopy(low).float(), x.float(), cot, "torch", existing)
    torch_low, _ = _run(low, x, cot, "torch", existing)
    triton_low, counts_tri = _run(low, x, cot, "triton", existing)
    assert torch.equal(counts, counts_tri)
    for name, ref in ref32.items():
        floor = EPS[dtype] * ref.abs().max().item()
        err_torch = (torch_low[name] - ref).abs().max().item()
        err_triton = (triton_low[name] - ref).abs().max().item()
        assert err_triton <= 2 * err_torch + floor, (
            f"{name}: triton {err_triton:.3e} vs torch {err_torch:.3e}"
        )


@pytest.mark.parametrize("recompute", [False, True])
def test_triton_fp32_matches_reference(recompute):
    layer = _layer(96, 2 * 72, 8, 3, False, torch.float32, recompute_activations=recompute)
    x, cot = torch.randn(300, 96, device="cuda"), torch.randn(300, 96, device="cuda")
    ref, _ = _run(layer, x, cot, "torch")
    got, _ = _run(layer, x, cot, "triton")
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("form", ["rows", "rows-kmajor", "wgrad", "swiglu", "gelu"])
def test_triton_grouped_gemm_paths_agree_on_unaligned_groups(form):
    """Every path (CUTLASS, TMA, pointer loads) of each GEMM form, bf16, against fp32 math; group sizes
    not multiples of any tile, one group empty."""
    torch.manual_seed(1)
    E, M, P, Q = 6, 1000, 256, 384
    counts = torch.bincount(torch.randint(0, E, (M,)), minlength=E)
    counts[2] = 0
    counts[0] += M - counts.sum()
    offs = torch.cumsum(counts, 0).int().cuda()
    a = torch.randn(M, P, device="cuda").bfloat16()
    if form == "wgrad":
        b = torch.randn(M, Q, device="cuda").bfloat16()
    elif form == "rows":
        b = torch.randn(E, P, Q, device="cuda").bfloat16()
    else:  # stored [E, Q, P] like w_up, used transposed
        b = torch.randn(E, Q, P, device="cuda").bfloat16().transpose(1, 2)
    paths = ["tma", "triton"] + ([] if form in ("swiglu", "gelu") else ["torch"])
    for path in paths:
        if form == "wgrad":
            got, ref = (
                grouped_mm_wgrad(a, b, offs, path),
                grouped_mm_wgrad(a.float(), b.float(), offs, "triton"),
            )
        elif form.startswith("rows"):
            got, ref = grouped_mm(a, b, offs, path), grouped_mm(a.float(), b.float(), offs, "triton")
        else:
            h, got = grouped_mm_act(a, b, offs, form, path)
            h_ref = grouped_mm(a.float(), b.float(), offs, "triton")
            assert ((h.float() - h_ref).norm() / h_ref.norm()).item() < 1e-2, path
            ref = activate(h.float(), form)  # from the rounded h, as the backward sees it
        rel = ((got.float() - ref).norm() / ref.norm()).item()
        assert rel < 1e-2, f"{path}: rel err {rel:.2e}"


def test_triton_tma_gathered_rows_bit_identical_to_gathered_copy():
    """bf16 on the TMA path: rows read through the slot index (pointer loads) give exactly what the
    same kernel gives on the permuted copy (TMA loads), for both storage orders of ``b``; groups
    unaligned, one empty, dropped slots past the live rows."""
    torch.manual_seed(2)
    E, M, P, Q, K = 6, 1000, 256, 384, 2
    counts = torch.bincount(torch.randint(0, E, (M,)), minlength=E)
    counts[2] = 0
    counts[0] += M - 40 - counts.sum()  # the last 40 rows are dropped slots
    offs = torch.cumsum(counts, 0).int().cuda()
    live = int(offs[-1])
    src = torch.randn(M // K, P, device="cuda").bfloat16()
    idx = torch.randperm(M, device="cuda").int()
    b_kmajor = torch.randn(E, Q, P, device="cuda").bfloat16().mT  # like w_up, used transposed
    for b in (torch.randn(E, P, Q, device="cuda").bfloat16(), b_kmajor):
        got = grouped_mm(src, b, offs, "tma", gather=(idx, K))[:live]
        assert torch.equal(got, grouped_mm(src[idx.long() // K], b, offs, "tma")[:live])


def test_triton_compile_fullgraph_no_recompile_on_new_routing():
    import torch._dynamo

    layer = _layer(128, 256, 8, 2, False, torch.bfloat16)
    layer.backend = "triton"
    compiled = torch.compile(layer, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):  # new tokens each step: new routing, same shapes
            torch.manual_seed(seed)
            x = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            out, losses = compiled(x)
            (out.float().square().sum() + losses["aux_loss"]).backward()
            ref_out, _ = layer(x.detach())
            torch.testing.assert_close(out, ref_out, rtol=2e-2, atol=2e-2)


def test_triton_compile_reduce_overhead_matches_eager():
    """What the README recommends for small shapes: torch.compile with CUDA graphs (cudagraph trees),
    forward and backward, against the same layer run eagerly; new routing every step."""
    layer = _layer(128, 256, 8, 2, False, torch.bfloat16)
    layer.backend = "triton"
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)

    def close(
        got, ref, name
    ):  # bf16 rounding differs where inductor fuses (2 ulps seen); stale data would not
        rel = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        assert rel < 1e-2, f"step {seed} {name}: rel err {rel:.2e}"

    for seed in range(4):  # the first calls warm up and record; the later ones replay the graphs
        torch.manual_seed(seed)
        x = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
        torch.compiler.cudagraph_mark_step_begin()
        layer.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
        x_c, x_e = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, losses = compiled(x_c)
        (out.float().square().sum() + losses["aux_loss"]).backward()
        ref, ref_losses = eager(x_e)
        (ref.float().square().sum() + ref_losses["aux_loss"]).backward()
        close(out, ref, "out")
        close(x_c.grad, x_e.grad, "x.grad")
        for (name, p), q in zip(layer.named_parameters(), eager.parameters(), strict=True):
            close(p.grad, q.grad, name + ".grad")


def test_triton_cuda_graph_capture_and_replay():
    """The single-GPU layer (through loopback) captures and replays bit for bit."""
    layer = _layer(128, 256, 8, 2, False, torch.bfloat16)
    layer.backend = "triton"
    check_graph_replays_match_eager(layer, copy.deepcopy(layer), 512, 128)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_router_logits_tensor_core_path_matches_fp32(dtype):
    from flashfusemoe.backends.torch import router_logits as ref_logits
    from flashfusemoe.backends.triton import router_logits

    x = torch.randn(1000, 512, device="cuda").to(dtype).requires_grad_()
    gate = (torch.randn(64, 512, device="cuda") * 0.05).to(dtype).requires_grad_()
    g = torch.randn(1000, 64, device="cuda") * 1e-2
    got = router_logits(x, gate)
    want = ref_logits(x, gate)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    gx, gg = torch.autograd.grad(got, (x, gate), g)
    wx, wg = torch.autograd.grad(want, (x, gate), g)
    for a, b in ((gx, wx), (gg, wg)):  # within one rounding of the result's dtype
        rel = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert rel <= EPS[dtype], rel


def test_triton_fast_launch_engages_and_honours_launch_hooks():
    """After the first call, launches skip Triton's dispatcher; while a launch hook is set they take
    Triton's path again, so profilers still see every kernel."""
    import triton

    from flashfusemoe.backends.triton.permute import _gather_rows_kernel, gather_rows

    x = torch.randn(64, 96, device="cuda")
    idx = torch.randperm(64, device="cuda").int()
    live = torch.tensor([64], dtype=torch.int32, device="cuda")
    want = x[idx.long()]
    for _ in range(2):
        assert torch.equal(gather_rows(x, idx, live, 1), want)
    assert any(k is not False for k in _gather_rows_kernel.compiled.values())
    seen = []
    hook = triton.knobs.runtime.launch_enter_hook
    if not hasattr(hook, "add"):
        pytest.skip("this Triton has no launch-hook chain")
    hook.add(seen.append)
    try:
        assert torch.equal(gather_rows(x, idx, live, 1), want)
    finally:
        hook.remove(seen.append)
    assert len(seen) == 1


def test_triton_fast_launch_falls_back_when_the_launcher_differs():
    """A Triton whose compiled-kernel launcher takes other arguments: Triton's own path from then on."""
    from flashfusemoe.backends.triton.permute import _gather_rows_kernel, gather_rows

    class OtherLauncher:
        function = packed_metadata = None

        def run(self, *args):
            raise TypeError("takes other arguments")

    x = torch.randn(32, 48, device="cuda")
    idx = torch.randperm(32, device="cuda").int()
    live = torch.tensor([32], dtype=torch.int32, device="cuda")
    gather_rows(x, idx, live, 1)
    keys = [k for k, v in _gather_rows_kernel.compiled.items() if v is not False]
    saved = {k: _gather_rows_kernel.compiled[k] for k in keys}
    try:
        for k in keys:
            _gather_rows_kernel.compiled[k] = OtherLauncher()
        assert torch.equal(gather_rows(x, idx, live, 1), x[idx.long()])
        assert any(_gather_rows_kernel.compiled[k] is False for k in keys)
    finally:
        _gather_rows_kernel.compiled.update(saved)


def test_triton_routing_at_fine_grained_scale():
    """T=16384, E=128, K=8: 131072 slots in 2048 metadata blocks (several passes of the block-prefix
    loop) and 1024 router blocks; ids, counts and losses equal the reference, layout the stable sort."""
    from flashfusemoe.backends import torch as ref
    from flashfusemoe.backends.triton import route as tri_route
    from flashfusemoe.backends.triton.metadata import routing_metadata
    from flashfusemoe.spec import RouterConfig, sort_slots_by_expert

    T, E, K = 16384, 128, 8
    logits = torch.randn(T, E, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    cfg = RouterConfig(top_k=K)
    got, want = tri_route(logits, cfg), ref.route(logits, cfg)
    assert torch.equal(got.topk_ids_TK.long(), want.topk_ids_TK)
    assert torch.equal(got.tokens_per_expert_E, want.tokens_per_expert_E)
    torch.testing.assert_close(got.load_balance_loss, want.load_balance_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.z_loss, want.z_loss, rtol=1e-5, atol=1e-6)
    meta = routing_metadata(got.topk_ids_TK, E)
    slots, counts = sort_slots_by_expert(want.topk_ids_TK, E)
    assert torch.equal(meta.row_slot_M.long(), slots)
    assert torch.equal(meta.offs_E.long(), torch.cumsum(counts, 0))


@pytest.mark.parametrize("gemm", ["triton", "quack"])
def test_triton_layer_is_run_to_run_deterministic(monkeypatch, gemm):
    """The same forward+backward twice: output, losses and every gradient equal bit for bit (no atomics:
    the combines sum a token's rows in k order, the router's statistics reduce in block order, the
    weight gradients own their tiles), on our GEMMs and on QuACK's (where it runs)."""
    from flashfusemoe.backends.triton import quack_gemm

    if gemm == "quack" and not quack_gemm.runs_here():
        pytest.skip("QuACK does not run here")
    monkeypatch.setenv("FLASHFUSEMOE_GEMM", gemm)
    layer = _layer(512, 1024, 16, 4, False, torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(11)
    x = torch.randn(4096, 512, device="cuda", generator=g).bfloat16()
    cot = torch.randn(4096, 512, device="cuda", generator=g)
    first, counts = _run(layer, x, cot, "triton")
    again, counts_again = _run(layer, x, cot, "triton")
    assert torch.equal(counts, counts_again)
    for name, value in first.items():
        assert torch.equal(value, again[name]), f"{name} differs between two identical runs"
