"""What one compiled block of ``full_integration.py`` keeps for backward, tensor by tensor.

    python -m integration.block_saved --preset seed-1b --seq 256     # CPU: the triton backend interpreted

The block is compiled the way ``--compile`` compiles it (AOTAutograd, the min-cut partitioner under an
activation memory budget, inductor's decompositions), but with a compiler that only reads the forward
graph: its outputs past the block's own are what backward will read. Parameters are left out. Sizes
are given in units of a ``[T, D]`` tensor of the run's dtype, so a run at a short sequence on the CPU
tells what a long one on the GPU keeps. Two saved tensors that are views of one storage on the GPU
(SDPA's output and the out projection's input under cuDNN) are two rows here.

``saved_tensors(cfg, seq, ...)`` -> rows ``(name, shape, dtype, units)``.

Legend: T tokens (batch 1 x seq), D model dim.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # a CPU tool: the triton backend runs interpreted

import torch
from torch._functorch.aot_autograd import aot_module_simplified
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.decomposition import select_decomp_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any directory

from integration.full_integration import _MEMORY_BUDGET, PRESETS, Block  # noqa: E402
from integration.rope import rope_table  # noqa: E402

__all__ = ["saved_tensors"]


def saved_tensors(
    cfg: dict,
    seq: int,
    budget: float = _MEMORY_BUDGET,
    recompute: bool | str = False,
    backend: str = "triton",
    dtype: torch.dtype = torch.float32,
) -> list[tuple[str, tuple[int, ...], torch.dtype, float]]:
    """The tensors one compiled ``Block(cfg)`` saves for backward on a ``[1, seq, D]`` input, as
    ``(graph node, shape, dtype, size in [T, D] units of dtype)``; ``recompute``: the MoE layer's
    ``recompute_activations``. Runs on the CPU (with ``TRITON_INTERPRET=1`` for the triton backend)."""
    if not (isinstance(seq, int) and seq >= 1):
        raise ValueError(f"seq must be an int >= 1 (tokens), got {seq!r}")
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1] (an activation memory budget), got {budget!r}")
    D = cfg["d_model"]
    block = Block(dict(cfg, sdpa="flash"), dict(backend=backend, recompute_activations=recompute))
    block = block.to(dtype)
    unit = seq * D * dtype.itemsize
    rows = []

    def read_forward(gm: torch.fx.GraphModule, _inputs):
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        for node in outputs[n_outputs:]:
            v = node.meta.get("val")
            # of the graph's inputs only the block's input counts (not weights, not the RoPE table)
            if isinstance(v, torch.Tensor) and (node.op != "placeholder" or v.shape == x.shape):
                rows.append((node.name, tuple(v.shape), v.dtype, v.numel() * v.element_size() / unit))
        return gm

    def compiler(gm: torch.fx.GraphModule, inputs):
        return aot_module_simplified(
            gm, inputs, fw_compiler=read_forward, bw_compiler=lambda g, _: g,
            partition_fn=min_cut_rematerialization_partition, decompositions=select_decomp_table(),
        )  # fmt: skip

    x = torch.randn(1, seq, D, dtype=dtype, requires_grad=True)
    rope = rope_table(seq, D // cfg["heads"]).to(dtype)
    with torch.no_grad():  # the block's own outputs: y, and a dict of losses and counts
        _, losses = block(x, rope)
    n_outputs = 1 + len(losses)
    old = torch._functorch.config.activation_memory_budget
    torch._functorch.config.activation_memory_budget = budget
    try:
        torch._dynamo.reset()
        torch.compile(block, backend=compiler, fullgraph=True)(x, rope)
    finally:
        torch._functorch.config.activation_memory_budget = old
        torch._dynamo.reset()
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--seq", type=int, default=None, help="tokens (batch 1); default: the preset's")
    p.add_argument("--budget", type=float, default=_MEMORY_BUDGET, help="activation memory budget")
    p.add_argument("--recompute", choices=["none", "shared", "all"], default="none")
    p.add_argument("--backend", default="triton")
    args = p.parse_args(argv)
    cfg = PRESETS[args.preset]
    recompute = {"none": False, "shared": "shared", "all": True}[args.recompute]
    rows = saved_tensors(cfg, args.seq or cfg["seq"], args.budget, recompute, args.backend)
    for name, shape, dtype, units in rows:
        print(f"{name:24s} {str(shape):24s} {str(dtype):16s} {units:7.3f}")
    print(f"total {sum(r[3] for r in rows):.2f} units of [T, D]")


if __name__ == "__main__":
    main()
