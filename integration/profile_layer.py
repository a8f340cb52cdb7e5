"""Where the time of one MoE layer forward+backward goes: eager vs CUDA-graph replay (the gap is CPU
launch overhead), the profiler's per-kernel GPU times, and (``--timeline``) one eager step's kernels in
GPU order with the idle time before each: where the GPU waits on the host.

``python integration/profile_layer.py --shape seed [--variant ours] [--timeline]``
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from integration.bench_layer import SHAPES, graphed_ms, make_inputs, timed, variants


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="seed", choices=SHAPES)
    p.add_argument("--variant", default="ours")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--timeline", action="store_true", help="one eager step's kernels in GPU order")
    args = p.parse_args()
    shape = SHAPES[args.shape]
    fn = variants(shape)[args.variant]
    x, gate, up, down, bias = make_inputs(shape, skew=False)
    x.requires_grad_()
    grad_out = torch.randn_like(x)
    params = [x, gate, up, down]

    def step():
        for t in params:
            t.grad = None
        fn(x, gate, up, down, bias).backward(grad_out)

    eager_ms = timed(step)
    graph_ms = graphed_ms(lambda: fn(x, gate, up, down, bias), grad_out, params)
    print(f"{args.variant} {args.shape}{shape}: eager {eager_ms:.3f} ms, CUDA graph {graph_ms:.3f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=50))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=50))
    if args.timeline:
        print_timeline(step)


def print_timeline(step) -> None:
    """One eager step from an idle GPU (as ``timed`` runs it): each kernel's start, duration and the
    idle gap before it, in us from the first kernel; then the step's busy and idle totals. A first
    step runs under the started profiler unrecorded: the tracer's own start-up (its buffers: ms of
    host time) would otherwise show as idle before the step's first kernels."""
    recorded = []
    torch.cuda.synchronize()
    with profile(
        activities=[ProfilerActivity.CUDA],
        schedule=schedule(wait=0, warmup=1, active=1),
        on_trace_ready=lambda prof: recorded.extend(prof.events()),
    ) as prof:
        for _ in range(2):
            step()
            torch.cuda.synchronize()
            prof.step()
    kernels = sorted(
        (e for e in recorded if e.device_type == torch.autograd.DeviceType.CUDA),
        key=lambda e: e.time_range.start,
    )
    if not kernels:
        return
    t0 = end = kernels[0].time_range.start
    busy = 0.0
    print(f"{'start us':>9} {'dur us':>8} {'idle before':>11}  kernel")
    for e in kernels:
        start, dur = e.time_range.start, e.time_range.elapsed_us()
        gap = max(0.0, start - end)
        print(f"{start - t0:9.1f} {dur:8.1f} {gap:11.1f}  {e.name[:90]}")
        busy += dur
        end = max(end, start + dur)
    span = end - t0
    print(f"step: {span:.1f} us, kernels {busy:.1f} us, idle {span - busy:.1f} us ({len(kernels)} kernels)")


if __name__ == "__main__":
    main()
