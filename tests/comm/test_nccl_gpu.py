"""The ``nccl`` communicator on NCCL with one GPU per rank (integration/ep_check.py checks each rank)."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "integration" / "ep_check.py"


@pytest.mark.multi_gpu
@pytest.mark.parametrize(
    "flags",
    [
        [],
        ["--backend", "triton", "--skew"],
        ["--backend", "triton", "--tokens", "300", "--experts", "8", "--empty-rank"],
    ],
    ids=["torch-backend", "triton-skewed", "triton-empty-rank"],
)
def test_nccl_two_gpus_ep_equals_unsharded(flags):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--pg", "nccl", "--world", "2", *flags],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(": OK") == 2
