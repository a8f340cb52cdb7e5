"""The all-to-all communicators over real gloo processes on CPU, and the custom communicator of
docs/expert_parallelism.md: dispatch has loopback's normal form and the EP-sharded layer equals the unsharded
one (integration/ep_check.py does the checking per rank)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "integration" / "ep_check.py"


def run_ep_check(flags, env=None, timeout=600, interpret=True):
    """Run ep_check.py with ``flags``; every rank must report OK. ``interpret``: Triton's CPU
    interpreter for the ranks' CPU tensors (off for CUDA tensors)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | (env or {})
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    world = int(flags[flags.index("--world") + 1])
    assert proc.stdout.count(": OK") == world and f"all {world} ranks OK" in proc.stdout, proc.stdout


@pytest.mark.parametrize(
    "flags",
    [  # W = 2 runs with every option below (skew, sync-free, bf16, triton, compiled)
        ["--world", "3", "--skew", "--empty-rank"],
        ["--world", "3", "--experts", "3", "--top-k", "3", "--seed", "5"],  # E = W = K
        ["--world", "4", "--experts", "16", "--top-k", "5", "--tokens", "20", "--seed", "2"],
        ["--world", "2", "--sync-free", "--skew"],
        ["--world", "2", "--dtype", "bf16", "--tokens", "40", "--d-model", "64", "--ffn-dim", "96"],
        ["--world", "2", "--backend", "triton", "--skew"],
        ["--world", "4", "--backend", "triton", "--experts", "8", "--top-k", "3", "--tokens", "30"],
        ["--world", "2", "--compile", "aot_eager", "--skew"],
        ["--world", "3", "--compile", "aot_eager", "--backend", "triton"],
    ],
    ids=[
        "w3-skewed-empty-rank",
        "w3-one-expert-per-rank-k-eq-e",
        "w4-e16-k5",
        "w2-sync-free-skewed",
        "w2-bf16-tolerance-rule",
        "w2-triton-skewed",
        "w4-triton",
        "w2-compiled",
        "w3-compiled-triton",
    ],
)
def test_gloo_ep_equals_unsharded(flags):
    run_ep_check(["--pg", "gloo", *flags])


def _docs_communicator_source() -> str:
    text = (ROOT / "docs" / "expert_parallelism.md").read_text()
    section = text[text.index("### Writing your own") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.parametrize("world", ["3"])  # 3 ranks: experts split unevenly
def test_docs_custom_communicator_equals_unsharded(tmp_path, world):
    (tmp_path / "docs_allgather.py").write_text(_docs_communicator_source())
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    flags = ["--pg", "gloo", "--world", world, "--comm", "docs_allgather:AllGatherCommunicator"]
    run_ep_check([*flags, "--same-tokens", "--skew"], env={"PYTHONPATH": path})
