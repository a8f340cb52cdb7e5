"""A/B on one GPU: this checkout's layer against another revision's, interleaved in one process.

``python integration/ab_layer.py --base DIR [--shapes seed,fine,mixtral] [--rounds 3] [--json F]``

``DIR`` is a checkout of the other revision (``git worktree add /tmp/base REV``). Its package is
copied and renamed (``flashfusemoe`` -> ``ffmoe_base``, its custom ops too) so that both import side
by side; both run the ``triton`` backend on the same inputs, in interleaved rounds whose order flips
every round (clock drift and warm-up hit both alike), and their outputs are compared. Variants:
``base`` (the base revision's single-GPU call), ``base EP loopback`` (its expert-parallel path
through ``loopback``, where it had one; ``--no-base-ep`` leaves it out), ``ours`` (this checkout:
always through the communicator, ``loopback`` here).

Legend: T tokens, D model dim, I expert intermediate dim, E experts, K top-k.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from flashfusemoe import RouterConfig, fused_moe
from integration.bench_layer import SHAPES, emit, make_inputs, memory_variant, time_variant

NAME = "ffmoe_base"


def load_base(checkout: Path):
    """The base revision's package under the name ``ffmoe_base``."""
    root = Path(tempfile.mkdtemp(prefix="ab_"))
    pkg = root / NAME
    shutil.copytree(checkout / "flashfusemoe", pkg)
    for sub in ("backends", "comm"):  # the install's package-dir mapping
        shutil.copytree(checkout / sub, pkg / sub)
    for f in pkg.rglob("*.py"):
        f.write_text(f.read_text().replace("flashfusemoe", NAME))
    sys.path.insert(0, str(root))
    return importlib.import_module(NAME)


def variants(base, K: int, base_ep: bool = True) -> dict:
    takes_config = "router" in inspect.signature(base.fused_moe).parameters

    def base_call(**kw):
        route = dict(router=base.RouterConfig(top_k=K)) if takes_config else dict(top_k=K)
        return lambda x, gate, up, down, bias: base.fused_moe(
            x, gate, up, down, **route, expert_bias=bias, backend="triton", **kw
        )[0]

    out = {"base": base_call()}
    if base_ep and not takes_config:  # revisions before the one-path redesign had a separate EP path
        out["base EP loopback"] = base_call(communicator=base.comm.get_communicator("loopback"))
    out["ours"] = lambda x, gate, up, down, bias: fused_moe(
        x, gate, up, down, RouterConfig(top_k=K), expert_bias=bias, backend="triton"
    )[0]
    return out


def render(card: str, rounds: int, rows: list[dict]) -> str:
    lines = [
        f"## This checkout vs a base revision, one process ({card})",
        "",
        f"`integration/ab_layer.py`: forward+backward, triton backend, bf16, balanced routing; median of "
        f"{rounds} interleaved rounds; ratio = variant / base (eager / graphed / into .grad / peak); "
        "`output = base`: bit-identical forward output.",
        "",
        "| shape | variant | fwd+bwd ms | graphed ms | into .grad ms | peak GiB | vs base | output = base |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = next(x for x in rows if x["shape"] == r["shape"] and x["variant"] == "base")
        ratios = " / ".join(f"{r[k] / b[k]:.3f}" for k in ("total_ms", "graph_ms", "acc_ms", "peak_gib"))
        lines.append(
            f"| {r['shape']} {SHAPES[r['shape']]} | {r['variant']} | {r['total_ms']:.2f} | "
            f"{r['graph_ms']:.2f} | {r['acc_ms']:.2f} | {r['peak_gib']:.2f} | {ratios} | "
            f"{r['same_output_as_base']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, type=Path, help="checkout of the revision to compare with")
    p.add_argument("--shapes", default="seed,fine,mixtral")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-base-ep", action="store_true", help="leave out the base revision's EP path")
    p.add_argument("--write", default=None, help="write the markdown table to this file")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    base = load_base(args.base)
    card = torch.cuda.get_device_name()
    rows = []
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        T, D, I, E, K = shape
        inputs = make_inputs(shape, skew=False)
        grad_out = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        chosen = variants(base, K, base_ep=not args.no_base_ep)
        outs = {n: fn(*inputs).detach() for n, fn in chosen.items()}
        times = {n: [] for n in chosen}
        for r in range(args.rounds):  # ABBA: the order flips every round, so no variant always runs first
            for name, fn in list(chosen.items())[:: 1 if r % 2 == 0 else -1]:
                # the base revision's EP path read the ids' range on the host: no CUDA graph
                times[name].append(time_variant(fn, inputs, grad_out, graph=name != "base EP loopback"))
        for name, fn in chosen.items():
            peak, peak_fresh, _ = memory_variant(fn, inputs, grad_out)
            _, total, graph, acc = (statistics.median(c) for c in zip(*times[name], strict=True))
            rows.append(
                dict(
                    shape=shape_name,
                    variant=name,
                    total_ms=total,
                    graph_ms=graph,
                    acc_ms=acc,
                    peak_gib=peak / 2**30,
                    peak_fresh_gib=peak_fresh / 2**30,
                    same_output_as_base=bool(torch.equal(outs[name], outs["base"])),
                )
            )
            print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    emit(render(card, args.rounds, rows), {"card": card, "rows": rows}, args.write, args.json)


if __name__ == "__main__":
    main()
