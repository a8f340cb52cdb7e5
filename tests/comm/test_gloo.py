"""The ``nccl`` communicator over real gloo processes on CPU: dispatch bit-exact vs loopback, and the
EP-sharded layer equal to the unsharded one (integration/ep_check.py does the checking per rank)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "integration" / "ep_check.py"


@pytest.mark.parametrize(
    "flags",
    [
        ["--world", "2"],
        ["--world", "3", "--skew", "--empty-rank"],
        ["--world", "3", "--experts", "3", "--top-k", "3", "--seed", "5"],  # E = W = K
        ["--world", "2", "--backend", "triton", "--skew"],  # Triton kernels (the interpreter on CPU)
    ],
    ids=["w2", "w3-skewed-empty-rank", "w3-one-expert-per-rank-k-eq-e", "w2-triton-backend"],
)
def test_gloo_ep_equals_unsharded(flags):
    env = dict(
        os.environ, TRITON_INTERPRET="1"
    )  # gloo ranks hold CPU tensors: Triton's interpreter runs them
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--pg", "gloo", *flags],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    world = int(flags[1])
    assert proc.stdout.count(": OK") == world and "all" in proc.stdout
