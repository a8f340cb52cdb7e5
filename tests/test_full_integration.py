"""integration/full_integration.py on CPU: the tiny preset trains; under torchrun with --ep_size 2 (gloo)
it gives the losses of one process on the same global batch; a checkpoint written at one EP size
resumes at another with the losses of an uninterrupted run; --data and --plot work."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from integration.ports import launcher

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "integration" / "full_integration.py"
# aux loss 0: a batch's load-balance loss is not the mean of its halves' (z-loss and CE are)
COMMON = ["--quiet", "--device", "cpu", "--backend", "torch", "--aux-loss-coeff", "0", "--expert-bias"]


def _run(tmp_path: Path, name: str, *flags: str, ep: int = 1) -> list[float]:
    metrics = tmp_path / f"{name}.json"
    cmd = [*launcher(ep), str(SCRIPT), *COMMON, "--ep_size", str(ep), "--metrics", str(metrics), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(metrics.read_text())["losses"]


def _close(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b) and a
    assert all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(a, b, strict=True)), (a, b)


def test_tiny_preset_trains_in_one_process(tmp_path):
    losses = _run(tmp_path, "one", "--profile", str(tmp_path / "profile.md"))
    assert len(losses) == 8 and all(0 < x < 20 for x in losses)
    summary = json.loads((tmp_path / "one.json").read_text())["summary"]
    assert summary["params_total"] == 288064 and summary["saved_bytes_per_moe_layer"] > 0
    times = summary["step_times_s"]  # one per step, within the loop's wall time
    assert len(times) == 8 and min(times) > 0 and sum(times) <= summary["loop_wall_s"]
    assert (tmp_path / "profile.md").read_text().startswith("GPU kernel time per step")


def test_recompute_lowers_saved_bytes_and_keeps_the_losses(tmp_path):
    """--recompute (every block), --recompute 1 (the first of the tiny preset's 2), --recompute-shared
    beside it (the shared experts of the other block too) and --recompute-shared 1 alone (the first
    block's shared experts only): the losses of a run that keeps everything, fewer saved bytes, the
    partial runs in between."""
    plain = _run(tmp_path, "plain")
    _close(_run(tmp_path, "recompute", "--recompute"), plain)
    _close(_run(tmp_path, "half", "--recompute", "1"), plain)
    _close(_run(tmp_path, "shared", "--recompute", "1", "--recompute-shared"), plain)
    _close(_run(tmp_path, "shared1", "--recompute-shared", "1"), plain)
    names = ("plain", "shared1", "half", "shared", "recompute")
    summaries = {n: json.loads((tmp_path / f"{n}.json").read_text())["summary"] for n in names}
    saved = {n: s["saved_bytes_per_moe_layer"] for n, s in summaries.items()}
    assert saved["recompute"] < saved["plain"] / 2, saved
    assert saved["half"] == (saved["plain"] + saved["recompute"]) // 2, saved
    assert saved["recompute"] < saved["shared"] < saved["half"], saved
    assert saved["half"] < saved["shared1"] < saved["plain"], saved
    assert [summaries[n]["recompute_blocks"] for n in names] == [0, 0, 1, 1, 2]
    assert [summaries[n]["recompute_shared_blocks"] for n in names] == [0, 1, 1, 2, 2]


def test_recompute_refuses_more_blocks_than_the_model_has():
    from integration.full_integration import parse_args, train

    for flag in ("--recompute", "--recompute-shared"):
        for n in ("3", "-1", "-2"):
            with pytest.raises(SystemExit, match=rf"{flag} {n}: a number of blocks in \[0, 2\]"):
                train(parse_args(["--device", "cpu", flag, n]))


def test_triton_adamw_another_attention_kernel_and_loss_chunk_train_alike(tmp_path):
    """--optimizer triton (integration/adamw.py; the interpreter here) stepping in backward, --sdpa flash
    (CPU: math either way) and the loss in chunks of 7 tokens (the tiny batch's 128 in 19 chunks, the
    last partial) train with the losses of torch's AdamW, the default order and one chunk."""
    flags = ("--optimizer", "triton", "--step-in-backward", "--sdpa", "flash", "--loss-chunk", "7")
    _close(_run(tmp_path, "triton", *flags), _run(tmp_path, "torch"))


@pytest.mark.gpu
def test_compiled_blocks_give_eager_gradients():
    """Every parameter's gradient through blocks compiled whole (the triton backend: no graph break)
    equals the eager model's (fp32). An autograd.Function of torch ops with two outputs inside such a
    graph once lost one output's gradient on the GPU and not on the CPU (docs/benchmarks.md)."""
    import copy

    from integration.full_integration import PRESETS, MoELM

    cfg = dict(PRESETS["tiny"], sdpa="cudnn")
    torch.manual_seed(0)
    eager = MoELM(cfg, backend="triton").cuda()
    compiled = copy.deepcopy(eager)
    for block in compiled.blocks:
        block.compile(fullgraph=True)
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"] + 1), device="cuda")
    for model in (eager, compiled):
        ce, aux, _ = model(ids)
        (ce + aux).backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        err = ((a.grad - b.grad).norm() / a.grad.norm()).item()
        assert err < 1e-4, (name, err)


def test_step_in_backward_refuses_torch_adamw_and_block_graphs():
    from integration.full_integration import parse_args, train

    with pytest.raises(SystemExit, match="--step-in-backward updates each parameter as backward"):
        train(parse_args(["--device", "cpu", "--step-in-backward"]))
    argv = ["--device", "cpu", "--optimizer", "triton", "--step-in-backward", "--compile"]
    with pytest.raises(SystemExit, match="--step-in-backward under block-by-block CUDA graphs"):
        train(parse_args([*argv, "--compile-mode", "reduce-overhead"]))


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("in_backward", [False, True])
def test_cuda_graph_of_the_whole_step_trains_like_eager_steps(tmp_path, compiled, in_backward):
    """--cuda-graph: 2 eager steps, then the captured step replayed (our capturable AdamW, with
    --step-in-backward on its side stream inside the graph; the expert bias updated in place between
    replays): the losses of the run that launches every step (after backward)."""
    gpu = ["--device", "cuda", "--backend", "triton", "--dtype", "fp32", "--steps", "6"]
    gpu += ["--compile", "--compile-mode", "default"] if compiled else []
    graph = [*gpu, "--cuda-graph", *(["--step-in-backward"] if in_backward else [])]
    _close(_run(tmp_path, "graph", *graph), _run(tmp_path, "launched", *gpu))


def test_cuda_graph_refuses_what_it_cannot_capture():
    from integration.full_integration import parse_args, train
    from integration.graphed_step import GraphedStep

    with pytest.raises(SystemExit, match="--cuda-graph captures the whole step on one GPU"):
        train(parse_args(["--device", "cpu", "--cuda-graph"]))
    with pytest.raises(ValueError, match="ids must be on a CUDA device"):
        GraphedStep(lambda ids: (ids,))(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        GraphedStep(lambda ids: (ids,), warmup=0)


@pytest.mark.gpu
def test_graphed_step_replays_its_capture_and_refuses_other_ids():
    """Two eager calls, then the capture: each call's output is the step of that call's ids (copied into
    the captured input), and ids of another shape or dtype after the capture are refused."""
    from integration.graphed_step import GraphedStep

    step = GraphedStep(lambda ids: (ids * 2 + 1,))
    for i in range(4):
        ids = torch.full((2, 3), i, dtype=torch.long, device="cuda")
        (out,) = step(ids)
        assert torch.equal(out, ids * 2 + 1)
    assert step._graph is not None
    with pytest.raises(
        ValueError, match=r"ids must be torch.int64 \(2, 3\) as captured, got torch.int64 \(3, 3\)"
    ):
        step(torch.zeros(3, 3, dtype=torch.long, device="cuda"))
    with pytest.raises(ValueError, match=r"as captured, got torch.int32 \(2, 3\)"):
        step(torch.zeros(2, 3, dtype=torch.int32, device="cuda"))


def test_memory_budget_needs_compile_and_a_fraction(capsys):
    from integration.full_integration import parse_args

    for argv in (
        ["--memory-budget", "0.5"],
        ["--compile", "--memory-budget", "0"],
        ["--compile", "--memory-budget", "1.5"],
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert "--memory-budget" in capsys.readouterr().err
    assert parse_args(["--compile", "--memory-budget", "1"]).memory_budget == 1.0
    with pytest.raises(SystemExit):
        parse_args(["--loss-chunk", "0"])
    assert "--loss-chunk=0: a number of tokens >= 1" in capsys.readouterr().err


def test_kernel_table_categories_and_busy_time():
    from integration.kernel_table import _busy_ms, _gaps, categorize, short_name

    assert _busy_ms([(0, 10), (5, 12), (20, 30), (25, 26)]) == (0.03, 0.022)
    kernels = [(0, 10, "a"), (5, 12, "b"), (20, 30, "c"), (25, 26, "d"), (31, 40, "e"), (100, 101, "f")]
    assert _gaps(kernels, 2) == [(60, "e", "f"), (8, "b", "c")]  # b ends the first busy stretch
    assert _gaps(kernels, 5)[-1] == (1, "c", "e")
    assert categorize("_tma_mm_kernel") == "MoE Triton kernels (ours)"
    assert categorize("_rope_kernel") == "rotary embedding (ours)"
    assert categorize("void at::native::vectorized_elementwise_kernel<4>") == "ATen elementwise (eager)"
    assert categorize("triton_poi_fused_add_0") == "compiler-fused elementwise/reductions"
    assert categorize("nvjet_sm90_tst_256x128") == "dense GEMM (cuBLAS)"
    foreach = (
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous "
        "namespace)::TensorListMetadata<2>, at::native::(anonymous namespace)::UnaryOpFunctor<float, 2, "
        "1, 1>>"
    )
    assert short_name(foreach, 110) == (
        "multi_tensor_apply_kernel<TensorListMetadata<2>, UnaryOpFunctor<float, 2, 1, 1>>"
    )
    assert short_name("_tma_mm_kernel", 5) == "_tma_"


def test_ep2_under_torchrun_equals_one_process(tmp_path):
    _close(_run(tmp_path, "ep2", ep=2), _run(tmp_path, "ep1"))


def test_ep2_with_the_global_and_sequence_losses_equals_one_process(tmp_path):
    """--aux-loss-global (the load-balance loss over both ranks' routed slots) and the sequence-wise loss
    (a mean over each rank's equal share of the sequences): EP = 2 trains like one process with both."""
    flags = ("--aux-loss-coeff", "0.05", "--seq-aux-loss-coeff", "0.05", "--aux-loss-global")
    _close(_run(tmp_path, "ep2g", *flags, ep=2), _run(tmp_path, "ep1g", *flags))


def test_ep2_compiled_under_torchrun_equals_one_process(tmp_path):
    """--compile (block by block, triton on the CPU interpreter) under EP: compiled blocks around the
    communicator's eager dispatch and combine train like one eager process."""
    flags = ("--backend", "triton", "--steps", "3")
    _close(_run(tmp_path, "ep2c", *flags, "--compile", ep=2), _run(tmp_path, "ep1e", *flags))


@pytest.mark.parametrize("save_ep, resume_ep", [(2, 1), (1, 2), (4, 2)])
def test_checkpoint_resumes_at_another_ep_size(tmp_path, save_ep, resume_ep):
    straight = _run(tmp_path, "straight", "--steps", "6")
    ckpt = str(tmp_path / "ckpt")
    first = _run(tmp_path, "first", "--steps", "3", "--save", ckpt, ep=save_ep)
    rest = _run(tmp_path, "rest", "--steps", "6", "--resume", ckpt, ep=resume_ep)
    _close(first + rest, straight)


def test_byte_data_is_learned_and_plot_is_written(tmp_path):
    data = tmp_path / "text.txt"
    data.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 200)
    plot = tmp_path / "run.png"
    losses = _run(tmp_path, "data", "--data", str(data), "--steps", "30", "--plot", str(plot))
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5])  # a repeated sentence: the loss falls fast
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not plot.exists()
    else:
        assert plot.stat().st_size > 0


def test_bench_e2e_writes_its_table_on_cpu(tmp_path, monkeypatch):
    from integration import bench_e2e

    monkeypatch.setattr(bench_e2e.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench_e2e.torch.cuda, "device_count", lambda: 0)
    out = tmp_path / "e2e.md"
    bench_e2e.main(["--backends", "torch", "--ep-sizes", "1,2", "--steps", "3", "--write", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| torch |")]
    assert len(rows) == 2 and not any("failed" in r for r in rows), out.read_text()


def test_peak_of_records_each_phase_and_restarts_the_counter(monkeypatch):
    """The GPU-only phase peaks, with the allocator's counters replaced by a script of values."""
    import torch

    from integration.full_integration import _peak_of

    values, resets = iter([3e9, 5e9]), []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: next(values))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: resets.append(1))
    phases = {}
    _peak_of(phases, None)
    _peak_of(phases, "forward")
    _peak_of(phases, "backward")
    _peak_of(None, "optimizer")  # not measuring: nothing read, nothing reset
    assert phases == {"forward": 3.0, "backward": 5.0} and len(resets) == 3


def test_attention_keeps_new_q_k_v_not_the_projection_output():
    """SDPA keeps q, k and v for backward: a v viewed in the qkv projection's output would keep all of
    that output alive beside the rotated q and k (2 [T, D] more a block)."""
    from integration.full_integration import Attention
    from integration.rope import rope_table

    torch.manual_seed(0)
    B, S, D, H = 2, 8, 32, 4
    attn, rope = Attention(D, H, "flash"), rope_table(S, D // H)
    proj = []  # held here, so that no later tensor can reuse its address
    attn.qkv.register_forward_hook(lambda m, i, out: proj.append(out))
    saved = set()

    def pack(t):
        saved.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = attn(torch.randn(B, S, D, requires_grad=True), rope)
    assert len(proj) == 1 and saved and proj[0].untyped_storage().data_ptr() not in saved
    y.sum().backward()
    assert attn.qkv.weight.grad.abs().sum() > 0


def test_compiled_block_saves_each_expert_h_once_and_recompute_drops_them():
    """One compiled tiny block (AOTAutograd, min-cut partitioner, the 0.95 budget, the triton backend):
    routed h [T*K, 2I] and shared h [T, 2I] kept once each, neither with recompute, shared h not with
    recompute="shared"; the qkv projection's [T, 3D] output never kept (RoPE writes new q, k, v)."""
    from integration.block_saved import saved_tensors
    from integration.full_integration import PRESETS

    cfg = PRESETS["tiny"]
    T, D, K, F = cfg["seq"], cfg["d_model"], cfg["top_k"], cfg["ffn_dim"]
    runs = {r: saved_tensors(cfg, T, recompute=r) for r in (False, "shared", True)}
    shapes = {r: [row[1] for row in rows] for r, rows in runs.items()}
    assert shapes[False].count((T * K, F)) == 1 and shapes[False].count((T, F)) == 1
    assert (T, F) not in shapes["shared"] and shapes["shared"].count((T * K, F)) == 1
    assert (T, F) not in shapes[True] and (T * K, F) not in shapes[True]
    assert all((T, 3 * D) not in s for s in shapes.values())
    units = {r: sum(row[3] for row in rows) for r, rows in runs.items()}
    assert units[True] < units["shared"] < units[False]


@pytest.mark.parametrize(
    "kw, match", [(dict(seq=0), "seq must be an int >= 1"), (dict(budget=0.0), "budget")]
)
def test_block_saved_refuses_bad_arguments(kw, match):
    from integration.block_saved import saved_tensors
    from integration.full_integration import PRESETS

    with pytest.raises(ValueError, match=match):
        saved_tensors(PRESETS["tiny"], **{"seq": 8, **kw})
