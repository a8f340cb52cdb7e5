"""Where the time of one MoE layer forward+backward goes: eager vs CUDA-graph replay (the gap is CPU
launch overhead) and the profiler's per-kernel GPU times.

``python integration/profile_layer.py --shape seed [--backend triton]``
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from integration.bench_layer import SHAPES, graphed_ms, make_inputs, timed, variants


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="seed", choices=SHAPES)
    p.add_argument("--variant", default="ours")
    p.add_argument("--rows", type=int, default=25)
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


if __name__ == "__main__":
    main()
