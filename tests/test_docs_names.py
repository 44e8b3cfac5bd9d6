"""Every ``fxcapture.xxx.yyy`` name that the package's docstrings, comments and messages
or the README mention exists (a module, or an attribute of one), and every
``python -m fxcapture...`` command they show starts."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

from conftest import SUBPROCESS_ENV

ROOT = Path(__file__).resolve().parents[1]
DOTTED = re.compile(r"(?<![\w./-])fxcapture(?:\.[A-Za-z_]\w*)+")
RUN_MODULE = re.compile(r"(?:python|torchrun)\b[^\n`]*?\s-m\s+(fxcapture[\w.]*)")


def _prose(path: Path) -> str:
    """The text a person reads: the README whole; of a Python file its comments and
    the string constants with a space in them (docstrings, messages), not identifiers
    such as a file-format tag."""
    source = path.read_text()
    if path.suffix != ".py":
        return source
    comments = [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]
    strings = [node.value for node in ast.walk(ast.parse(source))
               if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.search(r"\s", node.value)]  # fmt: skip
    return "\n".join(comments + strings)


def _documents() -> dict[Path, str]:
    paths = [ROOT / "README.md", *sorted((ROOT / "fxcapture").rglob("*.py"))]
    return {path.relative_to(ROOT): _prose(path) for path in paths}


def _resolves(name: str) -> bool:
    """``name`` is an importable module, or attributes of the longest importable prefix."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        if parts[i - 1] == "__main__":  # importing it would run it
            if importlib.util.find_spec(module) is not None and i == len(parts):
                return True
            continue
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError:
            continue
        for attribute in parts[i:]:
            if not hasattr(obj, attribute):
                return False
            obj = getattr(obj, attribute)
        return True
    return False


def test_every_dotted_name_in_the_docs_exists():
    mentions: dict[str, set[str]] = {}
    for path, text in _documents().items():
        for match in DOTTED.finditer(text):
            mentions.setdefault(match.group(0), set()).add(str(path))
    assert len(mentions) >= 10, sorted(mentions)  # the scan found the names it is meant to check
    missing = {name: sorted(paths) for name, paths in mentions.items() if not _resolves(name)}
    assert not missing, f"names of modules or attributes that do not exist: {missing}"


def test_the_scan_sees_stale_names(tmp_path):
    stale = tmp_path / "stale.py"
    stale.write_text('"""See :mod:`fxcapture.edit`."""\nFORMAT = "fxcapture.features"  # fxcapture.tracing\n')
    found = set(DOTTED.findall(_prose(stale)))
    assert found == {"fxcapture.edit", "fxcapture.tracing"}  # a format tag is not prose
    assert not any(_resolves(name) for name in found)
    assert _resolves("fxcapture.core.build.build_program") and _resolves("fxcapture.load")


def test_every_module_the_docs_run_starts():
    commands = {m for text in _documents().values() for m in RUN_MODULE.findall(text)}
    assert "fxcapture" in commands
    for module in sorted(commands):
        done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                              env=SUBPROCESS_ENV, timeout=300)  # fmt: skip
        assert done.returncode == 0 and done.stdout.startswith("usage: fxcapture"), (module, done.stderr)
