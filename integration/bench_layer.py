"""Benchmark the MoE layer on one GPU: ours (triton backend), the torch reference and a torchtitan-style
``torch._grouped_mm`` MoE, forward and forward+backward, with the grouped-GEMM floor and a dense bf16
GEMM ceiling measured in the same run. Where QuACK runs, ours also with its expert GEMMs forced
(``ours-triton-gemm``: none on QuACK; ``ours-quack-gemm``: all six); where SonicMoE imports, it too.

``python integration/bench_layer.py [--shapes seed,fine,mixtral] [--write docs/benchmarks.md]``

Legend: T tokens, D model dim, I expert intermediate dim, E experts, K top-k, N = T*K rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from flashfusemoe import RouterConfig, fused_moe
from flashfusemoe.backends.triton import quack_gemm
from flashfusemoe.backends.triton.grouped_gemm import grouped_mm, grouped_mm_wgrad

SHAPES = {  # T, D, I, E, K
    "seed": (8192, 1024, 2048, 8, 2),
    "fine": (16384, 2048, 768, 128, 8),
    "mixtral": (8192, 4096, 14336, 8, 2),
    "sonic-default": (32768, 4096, 1024, 128, 8),  # SonicMoE's own benchmark default
    "olmoe": (16384, 2048, 1024, 64, 8),
}
SONIC = "SonicMoE"
# ours with FLASHFUSEMOE_GEMM set, where QuACK runs: every GEMM on ours and torch._grouped_mm, and all six
# on QuACK whatever auto would choose (the A/B of auto's rule)
GEMM_VARIANTS = {"ours-triton-gemm": "triton", "ours-quack-gemm": "quack"}


def timed(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def dense_ceiling_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / timed(lambda: a @ b) / 1e9


def titan_moe(x_TD, gate_ED, w_up, w_down, bias_E, K):
    """torchtitan-style MoE: bf16 router GEMM, softmax/top-k in PyTorch, argsort permutation,
    torch._grouped_mm up and down, SwiGLU in PyTorch, weighted index_add_ combine."""
    T, D = x_TD.shape
    E = gate_ED.shape[0]
    scores_TE = F.linear(x_TD, gate_ED).float().softmax(-1)
    ids_TK = torch.topk(scores_TE + bias_E, K, dim=-1).indices
    w_TK = scores_TE.gather(1, ids_TK)
    w_TK = w_TK / w_TK.sum(-1, keepdim=True)
    counts_E = torch.histc(ids_TK.view(-1).float(), bins=E, min=0, max=E - 1)
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    order_N = torch.argsort(ids_TK.view(-1), stable=True)
    token_N = order_N // K
    h = torch._grouped_mm(x_TD[token_N], w_up.transpose(-2, -1), offs=offs_E)
    gate, up = h.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, w_down.transpose(-2, -1), offs=offs_E)
    y = (y.float() * w_TK.view(-1)[order_N, None]).to(x_TD.dtype)
    return torch.zeros_like(x_TD).index_add_(0, token_N, y)


def make_inputs(shape, skew: bool, seed: int = 0):
    T, D, I, E, K = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s, std=1.0: (torch.randn(*s, device="cuda", generator=g) * std).to(torch.bfloat16)
    x = mk(T, D)
    gate = mk(E, D, std=D**-0.5)
    w_up = mk(E, 2 * I, D, std=D**-0.5).requires_grad_()
    w_down = mk(E, D, I, std=I**-0.5).requires_grad_()
    bias = torch.zeros(E, device="cuda")
    if skew:  # a quarter of the experts take most of the slots; several experts run empty
        bias[: max(1, E // 4)] = 0.05 if E > 16 else 0.25
    return x, gate.requires_grad_(), w_up, w_down, bias


def variants(shape):
    K = shape[4]

    def ours(backend, recompute=False):
        return lambda x, gate, up, down, bias: fused_moe(
            x,
            gate,
            up,
            down,
            RouterConfig(top_k=K),
            expert_bias=bias,
            backend=backend,
            recompute_activations=recompute,
        )[0]

    out = {"ours": ours("triton")}
    if quack_gemm.runs_here():
        out |= {
            name: _with_env("FLASHFUSEMOE_GEMM", mode, ours("triton")) for name, mode in GEMM_VARIANTS.items()
        }
    out |= {
        "ours+recompute": ours("triton", True),
        "grouped_mm baseline": lambda x, gate, up, down, bias: titan_moe(x, gate, up, down, bias, K),
        "torch reference": ours("torch"),
    }
    sonic = _sonic_layer(K)
    if sonic is not None:
        out[SONIC] = sonic
    return out


def _with_env(name: str, value: str, fn):
    """``fn`` called with the environment variable ``name`` set to ``value`` (restored after)."""

    def call(*args):
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn(*args)
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old

    return call


def _sonic_layer(K: int):
    """SonicMoE's fused layer (softmax over the top-k logits = our renormalized softmax top-k) on our
    weight layout, where the ``sonic-moe`` wheel imports (a baseline, never a dependency); else None.
    It takes no selection bias: run it on balanced routing only."""
    try:
        from sonicmoe import moe_TC_softmax_topk_layer
    except ImportError:
        return None

    def layer(x, gate, up, down, bias):
        stream = torch.cuda.current_stream().cuda_stream
        out = moe_TC_softmax_topk_layer(
            x, gate, up.permute(1, 2, 0), None, down.permute(1, 2, 0), None, K, stream, concat_layout=True
        )
        return out[0]

    return layer


def _bind(fn, inputs):
    """``fwd()`` on fresh leaves, and the leaves whose gradients backward produces."""
    x, gate, up, down, bias = inputs
    x = x.detach().requires_grad_()
    return (lambda: fn(x, gate, up, down, bias)), [x, gate, up, down]


def time_variant(fn, inputs, grad_out, graph: bool) -> tuple[float, float, float, float]:
    """Median ms of forward, of forward+backward (gradients None before each), of forward+backward
    replayed from a CUDA graph, and of forward+backward adding into existing gradient buffers (as in
    gradient accumulation)."""
    fwd, params = _bind(fn, inputs)

    def fwd_bwd():
        for p in params:
            p.grad = None
        fwd().backward(grad_out)

    fwd_ms, total_ms = timed(fwd), timed(fwd_bwd)
    graph_ms = float("nan")
    if graph:
        try:
            graph_ms = graphed_ms(fwd, grad_out, params)
        except RuntimeError as e:  # a peer's layer that syncs with the host cannot be captured
            print(f"CUDA graph capture failed, graphed time left out: {e}", flush=True)
            torch.cuda.synchronize()
    for p in params:
        p.grad = torch.zeros_like(p)
    acc_ms = timed(lambda: fwd().backward(grad_out))
    for p in params:
        p.grad = None
    return fwd_ms, total_ms, graph_ms, acc_ms


def _one_step(fn, inputs, grad_out) -> list:
    """One forward+backward on fresh leaves: the output, then the gradients of x, gate, w_up, w_down
    (None where the variant gives none); the leaves' ``.grad`` is cleared again."""
    fwd, params = _bind(fn, inputs)
    out = fwd()
    out.backward(grad_out)
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    return [out.detach(), *grads]


def first_call_s(fn, inputs, grad_out) -> float:
    """Seconds of the first forward+backward at this shape: compilation and autotuning included."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    _one_step(fn, inputs, grad_out)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def rel_errors(fn, inputs, grad_out, reference) -> list[float]:
    """Relative L2 errors of the output and of each input's gradient (x, gate, w_up, w_down) against
    ``reference`` (the fp32 torch-reference results on the same inputs upcast); inf for a gradient the
    variant does not produce."""
    return [
        float("inf") if g is None else ((g.float() - r).norm() / r.norm()).item()
        for g, r in zip(_one_step(fn, inputs, grad_out), reference, strict=True)
    ]


def fp32_reference(shape, inputs, grad_out) -> list:
    """Output and (x, gate, w_up, w_down) gradients of the torch reference backend in fp32."""
    upcast = [t.detach().float().requires_grad_(t.requires_grad) for t in inputs]
    return _one_step(variants(shape)["torch reference"], upcast, grad_out.float())


def memory_variant(fn, inputs, grad_out) -> tuple[int, int, int]:
    """Peak bytes of forward+backward above inputs, weights and persistent gradient buffers (as in
    training); the same above inputs and weights when the gradients are created by this backward (the
    first micro-batch after ``zero_grad()``); and the bytes the forward keeps for backward."""
    fwd, params = _bind(fn, inputs)
    peaks = []
    for existing in (True, False):
        for p in params:
            p.grad = torch.zeros_like(p) if existing else None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fwd()
        saved = torch.cuda.memory_allocated() - base - out.numel() * out.element_size()
        out.backward(grad_out)
        peaks.append(torch.cuda.max_memory_allocated() - base)
        del out
        for p in params:
            p.grad = None
    return peaks[0], peaks[1], saved


def graphed_ms(fwd, grad_out, params) -> float:
    """fwd+bwd replayed from a CUDA graph: the GPU time without CPU launch overhead. Gradients are
    None at capture, as in the eager timing: the graph assigns them rather than adding into them."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fwd().backward(grad_out)
    torch.cuda.current_stream().wait_stream(stream)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fwd().backward(grad_out)
    ms = timed(graph.replay)
    del graph
    return ms


def gemm_floor(shape, inputs):
    """Forward, dX and dW grouped GEMMs alone on pre-permuted rows (torch._grouped_mm and Triton)."""
    T, D, I, E, K = shape
    x, gate, up, down, bias = inputs
    N = T * K
    counts = torch.full((E,), N // E, device="cuda")
    counts[0] += N - counts.sum()
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xp = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(N, 2 * I, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(N, I, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)
    u, d = up.detach(), down.detach()

    def gemms(path):
        return {
            "fwd": lambda: (
                grouped_mm(xp, u.transpose(1, 2), offs, path),
                grouped_mm(a, d.transpose(1, 2), offs, path),
            ),
            "dx": lambda: (grouped_mm(gy, d, offs, path), grouped_mm(h, u, offs, path)),
            "dw": lambda: (grouped_mm_wgrad(gy, a, offs, path), grouped_mm_wgrad(h, xp, offs, path)),
        }

    out = {}
    for name, path in (("torch._grouped_mm", "torch"), ("triton TMA", "tma"), ("triton pointer", "triton")):
        out[name] = {step: timed(fn) for step, fn in gemms(path).items()}
    return out


def _best_of(paths: dict) -> dict:
    """The GEMM floor per step: the fastest path for each of forward, dX and dW."""
    return {k: min(t[k] for t in paths.values()) for k in ("fwd", "dx", "dw")}


def _vs_sonic(rows: list, r: dict) -> str:
    """``r``'s eager forward+backward time over SonicMoE's, same shape and routing; '' without it."""
    sonic = [
        b for b in rows if b["variant"] == SONIC and (b["shape"], b["routing"]) == (r["shape"], r["routing"])
    ]
    return f"{r['total_ms'] / sonic[0]['total_ms']:.2f}" if sonic else ""


def _max_error(r: dict) -> str:
    """The largest of ``r``'s relative errors vs the fp32 reference; '' where none was measured."""
    return f"{max(r['rel_errs']):.4f}" if r.get("rel_errs") else ""


def render(card: str, ceiling: float, rows: list, floors: dict) -> str:
    """The markdown table written to docs/benchmarks.md."""
    lines = [
        f"# Benchmarks: MoE layer forward+backward on {card}",
        "",
        f"Dense bf16 GEMM ceiling measured in the same run: {ceiling:.0f} TFLOP/s. Times are medians of "
        "20 runs (CUDA events), then the median over interleaved rounds. `vs baseline` = baseline time "
        "/ ours, same shape, routing and run; `graphed` = replayed from a CUDA graph (no launch overhead). "
        "`max load` = hottest expert's slots / mean. `into .grad` = forward+backward with the gradient "
        "buffers already there (gradient accumulation, `zero_grad(set_to_none=False)`): autograd adds "
        "into them, our backward adds the expert weights' gradients in its GEMMs. Memory: `peak` = peak of "
        "forward+backward above the inputs, weights and those gradient buffers; `peak, new .grad` = above "
        "the inputs and weights when this backward creates the gradients (the first micro-batch after "
        "`zero_grad()`: the gradients themselves count); `saved` = what the forward keeps for backward. "
        "`non-GEMM` = share of the graphed time above the GEMM floor (fastest path per GEMM, table below). "
        "`rel. err` = largest relative L2 error of the output and the gradients of x, gate, w_up, w_down "
        "against the fp32 torch reference on the same inputs (balanced routing; the baseline's is PyTorch's "
        "own bf16 error). `time / SonicMoE's` = eager forward+backward time over SonicMoE's (where its "
        "wheel imports; balanced routing only: it takes no selection bias); `first call` = the first "
        "forward+backward at the shape, compilation and autotuning included.",
        "",
        "| shape (T,D,I,E,K) | routing | max load | variant | fwd ms | fwd+bwd ms | graphed ms | "
        "into .grad ms | TFLOP/s | % ceiling | peak GiB | peak, new .grad | saved GiB | vs baseline | "
        "graphed vs baseline | into .grad vs baseline | peak vs baseline | non-GEMM | rel. err | "
        "time / SonicMoE's | first call s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next(
            b
            for b in rows
            if b["shape"] == r["shape"]
            and b["routing"] == r["routing"]
            and b["variant"] == "grouped_mm baseline"
        )
        lines.append(
            f"| {r['shape']} {SHAPES[r['shape']]} | {r['routing']} | {r['max_load']:.2f} | {r['variant']} | "
            f"{r['fwd_ms']:.2f} | {r['total_ms']:.2f} | {r['graph_ms']:.2f} | {r['acc_ms']:.2f} | "
            f"{r['tflops']:.0f} | {100 * r['tflops'] / ceiling:.0f}% | "
            f"{r['peak_gib']:.2f} | {r['peak_fresh_gib']:.2f} | {r['saved_gib']:.2f} | "
            f"{base['total_ms'] / r['total_ms']:.2f}x | {base['graph_ms'] / r['graph_ms']:.2f}x | "
            f"{base['acc_ms'] / r['acc_ms']:.2f}x | {r['peak_gib'] / base['peak_gib']:.2f}x | "
            f"{100 * (1 - sum(_best_of(floors[r['shape']]).values()) / r['graph_ms']):.0f}% | "
            f"{_max_error(r)} | {_vs_sonic(rows, r)} | "
            f"{r.get('first_call_s', float('nan')):.1f} |"
        )
    lines += [
        "",
        "## Grouped-GEMM floor (pre-permuted rows, balanced groups), ms",
        "",
        "| shape | path | fwd (up+down) | dX (2) | dW (2) | total |",
        "|---|---|---|---|---|---|",
    ]
    for shape_name, paths in floors.items():
        for path, t in {**paths, "best of each": _best_of(paths)}.items():
            lines.append(
                f"| {shape_name} | {path} | {t['fwd']:.2f} | {t['dx']:.2f} | {t['dw']:.2f} | "
                f"{t['fwd'] + t['dx'] + t['dw']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def emit(
    table: str, payload: object, write: str | None, json_path: str | None, section: str | None = None
) -> None:
    """Print the markdown ``table``; write it to ``write`` and ``payload`` as JSON to ``json_path``.

    With ``section``, ``write`` is a shared page (docs/benchmarks.md): only the block between the lines
    ``<!-- section -->`` and ``<!-- /section -->`` is replaced, everything around it kept; a page without
    that block gets it appended."""
    print(table)
    if write and section is None:
        with open(write, "w") as f:
            f.write(table)
    elif write:
        start, end = f"<!-- {section} -->\n", f"<!-- /{section} -->\n"
        page = open(write).read() if os.path.exists(write) else ""
        block = start + table + end
        if start in page and end in page.split(start, 1)[1]:
            head, rest = page.split(start, 1)
            page = head + block + rest.split(end, 1)[1]
        else:
            page += ("\n" if page and not page.endswith("\n\n") else "") + block
        with open(write, "w") as f:
            f.write(page)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(payload, f, indent=1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shapes", default="seed,fine,mixtral")
    p.add_argument("--skip-reference", action="store_true", help="skip the (slow) torch reference")
    p.add_argument("--variants", default=None, help="comma list (the grouped_mm baseline always runs)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median taken)")
    p.add_argument("--write", default=None, help="write the table into its block of this page")
    p.add_argument("--json", default=None)
    p.add_argument(
        "--warm",
        action="store_true",
        help="only run each chosen variant's forward+backward once per shape (compiles and tunes its "
        "kernels: SonicMoE's first call takes minutes) and exit",
    )
    args = p.parse_args(argv)
    known = [*variants(SHAPES["seed"]), SONIC, *GEMM_VARIANTS]
    unknown = [v for v in (args.variants or "").split(",") if v and v not in known]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {known}")
    bad_shapes = [s for s in args.shapes.split(",") if s not in SHAPES]
    if bad_shapes:
        p.error(f"--shapes: unknown {bad_shapes}; choose from {list(SHAPES)}")
    card = torch.cuda.get_device_name()
    ceiling = dense_ceiling_tflops()
    rows, floors = [], {}
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        T, D, I, E, K = shape
        flops_fwd = 2 * T * K * (D * 2 * I + I * D)
        if not args.warm:
            floors[shape_name] = gemm_floor(shape, make_inputs(shape, False))
        for skew in (False, True):
            inputs = make_inputs(shape, skew)
            grad_out = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
            counts = torch.bincount(
                torch.topk(F.linear(inputs[0], inputs[1]).float().softmax(-1) + inputs[4], K).indices.view(
                    -1
                ),
                minlength=E,
            )
            load = (counts.max() / counts.float().mean()).item()
            chosen = {
                n: f
                for n, f in variants(shape).items()
                if not (n == "torch reference" and args.skip_reference)
                and not (n == SONIC and skew)  # it takes no selection bias
                and (args.variants is None or n in args.variants.split(",") or n == "grouped_mm baseline")
            }
            first = {n: first_call_s(f, inputs, grad_out) for n, f in chosen.items()}
            print(json.dumps(dict(shape=shape_name, skewed=skew, first_call_s=first)), flush=True)
            if args.warm:
                continue
            reference = None if skew else fp32_reference(shape, inputs, grad_out)
            times = {n: [] for n in chosen}
            for _ in range(
                args.rounds
            ):  # interleaved rounds: clock or thermal drift hits every variant alike
                for name, fn in chosen.items():
                    times[name].append(time_variant(fn, inputs, grad_out, graph=name != "torch reference"))
            for name, fn in chosen.items():
                peak, peak_fresh, saved = memory_variant(fn, inputs, grad_out)
                fwd_ms, total_ms, graph_ms, acc_ms = (
                    statistics.median(col) for col in zip(*times[name], strict=True)
                )
                rows.append(
                    dict(
                        shape=shape_name,
                        routing="skewed" if skew else "balanced",
                        max_load=load,
                        variant=name,
                        fwd_ms=fwd_ms,
                        total_ms=total_ms,
                        graph_ms=graph_ms,
                        acc_ms=acc_ms,
                        tflops=3 * flops_fwd / total_ms / 1e9,
                        peak_gib=peak / 2**30,
                        peak_fresh_gib=peak_fresh / 2**30,
                        saved_gib=saved / 2**30,
                        first_call_s=first[name],
                        rel_errs=rel_errors(fn, inputs, grad_out, reference) if reference else [],
                    )
                )
                print(json.dumps(rows[-1]), flush=True)
            del reference
            torch.cuda.empty_cache()
    if args.warm:
        return
    payload = {"card": card, "ceiling_tflops": ceiling, "rows": rows, "floors": floors}
    emit(render(card, ceiling, rows, floors), payload, args.write, args.json, section="bench_layer")


if __name__ == "__main__":
    main()
