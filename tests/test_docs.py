"""Every ```python block of the README and docs/ runs (a file's blocks in order, in one namespace).
Signatures and sketches are fenced as ```text; shell commands as ```bash (the README's are CI's; the
training script's are run by tests/test_full_integration.py)."""

import re
from pathlib import Path

import pytest

import flashfusemoe.comm

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M)


@pytest.mark.parametrize("path", [p for p in DOCS if _blocks(p)], ids=lambda p: p.name)
def test_doc_examples_run(path, monkeypatch):
    if "import transformers" in path.read_text():
        pytest.importorskip("transformers", reason="transformers is a test extra")
    # an example may register a communicator: that stays inside this test
    monkeypatch.setattr(flashfusemoe.comm, "_FACTORIES", dict(flashfusemoe.comm._FACTORIES))
    namespace = {"__name__": f"docs_{path.stem}"}
    for i, block in enumerate(_blocks(path)):
        exec(compile(block, f"{path.name}[block {i}]", "exec"), namespace)


def test_docs_link_to_existing_files():
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#]+\.md)\)", path.read_text()):
            assert (path.parent / target).exists(), f"{path.name} links to missing {target}"
