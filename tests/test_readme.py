"""Every Python block of README.md runs as written (random weights, in a temp folder).

Blocks are numbered in README order and named after their section; a block that is
not self-contained fails here, so the README cannot drift from the code.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fxcapture import get_local

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

def readme_blocks() -> list[tuple[str, int, str]]:
    """(section, line, code) of every ```python block."""
    text = README.read_text()
    blocks = []
    for found in _BLOCK.finditer(text):
        before = text[: found.start()]
        headings = re.findall(r"^## (.+)$", before, re.M)
        blocks.append((headings[-1] if headings else "(top)", before.count("\n") + 2, found.group(1)))
    return blocks


def _params():
    for section, line, code in readme_blocks():
        yield pytest.param(code, line, id=f"line{line}-{section[:30]}")


def test_readme_has_python_blocks():
    assert len(readme_blocks()) >= 6


@pytest.mark.parametrize("code,line", list(_params()))
def test_readme_block_runs(code, line, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files (save="grid.png") write here
    torch.manual_seed(0)
    try:
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    finally:  # a block may switch the global get_local cache on
        get_local.deactivate()
        get_local.clear()
