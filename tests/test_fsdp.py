"""MoELayer under FSDP2 (``fully_shard``) over gloo processes: meta-device init, data parallel,
gradient accumulation and EP beside FSDP2 equal the unsharded model (integration/fsdp_check.py holds
the checks)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "integration" / "fsdp_check.py"


@pytest.mark.parametrize("world, backend", [("2", "torch"), ("3", "triton")])
def test_fsdp2_trains_like_the_unsharded_model(world, backend):
    env = dict(os.environ, TRITON_INTERPRET="1")  # the triton backend's kernels on the CPU
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--world", world, "--backend", backend],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"all {world} ranks OK" in proc.stdout
