"""End-to-end benchmark: ``full_integration.py`` with the fused (triton) and the reference (torch) backend
at every EP size this machine has GPUs for, same run; the rows go to a markdown table.

    python -m integration.bench_e2e [--preset seed-1b] [--steps 12] [--compile] [--write FILE]

EP = 1 runs in one process; EP = W > 1 under ``torchrun --nproc_per_node=W`` with ``--comm`` (one GPU
per rank, so only up to the GPUs present). On a CPU-only machine it runs the tiny preset at EP = 1 and
2 (gloo; triton on its interpreter), which checks the plumbing, not speed. Each run's summary comes
from its ``--metrics`` file.

Legend: W EP world size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from integration.bench_layer import emit
from integration.ports import launcher

SCRIPT = Path(__file__).resolve().parent / "full_integration.py"


def run_one(preset: str, backend: str, W: int, args, out_dir: Path) -> dict:
    metrics = out_dir / f"{preset}_{backend}_ep{W}.json"
    cmd = [*launcher(W), str(SCRIPT), "--preset", preset, "--backend", backend, "--ep_size", str(W)]
    cmd += ["--steps", str(args.steps), "--quiet", "--metrics", str(metrics)]
    cmd += ["--compile"] * args.compile + (["--comm", args.comm] if W > 1 else [])
    cmd += [] if torch.cuda.is_available() else ["--device", "cpu"]
    env = dict(os.environ) if torch.cuda.is_available() else dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    if proc.returncode != 0:
        return dict(preset=preset, backend=backend, ep_size=W, error=(proc.stdout + proc.stderr)[-500:])
    return json.loads(metrics.read_text())["summary"]


def render(rows: list[dict], card: str, args) -> str:
    lines = [
        f"## End to end: `full_integration.py --preset {args.preset}`{' --compile' if args.compile else ''} "
        f"({card}; {args.steps} steps, p50)",
        "",
        "| backend | EP | p50 step ms | tokens/s (all GPUs) | MFU per GPU | peak GB per GPU | "
        "vs triton, EP 1 |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    base = next(
        (r for r in rows if r.get("backend") == "triton" and r["ep_size"] == 1 and "error" not in r), None
    )
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['ep_size']} | failed: {r['error'][-120:]!r} | | | | |")
            continue
        mfu = "n/a" if r.get("mfu") is None else f"{r['mfu']:.1%}"
        peak = "n/a" if r.get("peak_memory_GB") is None else f"{r['peak_memory_GB']:.1f}"
        ratio = f"{r['p50_step_s'] / base['p50_step_s']:.2f}" if base else "n/a"
        lines.append(
            f"| {r['backend']} | {r['ep_size']} | {r['p50_step_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | "
            f"{mfu} | {peak} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    gpus = torch.cuda.device_count()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="seed-1b" if gpus else "tiny")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--backends", default="triton,torch")
    p.add_argument("--ep-sizes", default=None, help="default: 1, 2, 4, 8 up to the GPUs present (CPU: 1, 2)")
    p.add_argument("--comm", default="nccl")
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--write", default=None, help="write the table into its block of this page")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.ep_sizes:
        sizes = [int(w) for w in args.ep_sizes.split(",")]
    else:
        sizes = [w for w in (1, 2, 4, 8) if w <= gpus] if gpus else [1, 2]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for W in sizes:
            for backend in args.backends.split(","):
                rows.append(run_one(args.preset, backend, W, args, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
    card = torch.cuda.get_device_name() if gpus else "CPU (plumbing check, not speed)"
    emit(render(rows, card, args), rows, args.write, args.json, section="bench_e2e")


if __name__ == "__main__":
    main()
