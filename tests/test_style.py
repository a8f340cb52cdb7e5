"""Lint gate: ruff over the repository (includes the ban on top-level ``comm`` / ``backends`` imports)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_bans_top_level_comm_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import comm\nimport backends\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--config",
            str(ROOT / "pyproject.toml"),
            "--select",
            "TID251",
            str(bad),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and proc.stdout.count("TID251") == 2, proc.stdout
