"""The package as a user gets it: a wheel installed (not editable) into a fresh venv,
run from outside the checkout. The README's first command works, the demo model keeps
its locals (an installed package's model is the model's code, wherever it lives), the
examples run; and the declared Python versions are the ones the README names."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from conftest import VENV_BIN as BIN
from conftest import run_outside as _run
from fxcapture.cli.models import Attention, TinyViT
from test_readme import readme_blocks

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_readme_first_command_from_an_installed_wheel(venv, tmp_path):
    demo = _run([venv / BIN / "fxcapture", "demo"], cwd=tmp_path)
    assert re.search(r"^\s+blocks\.0\.attn:attn\s+\(4, 3, 65, 65\)$", demo.stdout, re.M), demo.stdout
    listed = _run([venv / BIN / "fxcapture", "names", "demo:vit"], cwd=tmp_path).stdout
    keys = {line.split()[0] for line in listed.splitlines()[2:] if line.strip()}
    # reference: the variables of the demo model's own Attention.forward (all but self)
    variables = Attention.forward.__code__.co_varnames[1 : Attention.forward.__code__.co_nlocals]
    assert {"attn", "q", "k", "v"} <= set(variables)
    expected = {f"blocks.{i}.attn:{name}" for i in range(len(TinyViT().blocks)) for name in variables}
    assert expected <= keys, sorted(expected - keys)


@pytest.mark.slow
@pytest.mark.parametrize("script, args, says", [
    ("activation_patching.py", [], "zero-ablating one head"),
    ("monitor_training.py", [], "blocks.1.attn:attn"),
    ("sentence_embeddings.py", [], "neighbours on the same topic"),
    ("token_probe.py", ["--documents", "60", "--steps", "20"], "linear probe 'is a space'"),
])  # fmt: skip
def test_examples_run_from_the_installed_wheel(venv, tmp_path, script, args, says):
    done = _run([venv / BIN / "python", ROOT / "examples" / script, *args], cwd=tmp_path, TMPDIR=str(tmp_path))
    assert says in done.stdout


# runs every README block in order, each in a fresh namespace and folder, as a user pastes them
README_RUNNER = """
import json, os, sys, tempfile
import torch
from fxcapture import get_local
for name, code in json.load(open(sys.argv[1])):
    os.chdir(tempfile.mkdtemp(dir=sys.argv[2]))
    torch.manual_seed(0)
    exec(compile(code, name, "exec"), {"__name__": "__readme__"})
    get_local.deactivate()
    get_local.clear()
    print("\\nREADME block ran:", name)
"""


@pytest.mark.slow
def test_readme_blocks_run_from_the_installed_wheel(venv, tmp_path):
    blocks = [(f"README.md:{line}", code) for _, line, code in readme_blocks()]
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    (tmp_path / "runner.py").write_text(README_RUNNER)
    done = _run([venv / BIN / "python", "runner.py", "blocks.json", tmp_path], cwd=tmp_path, TMPDIR=str(tmp_path))
    ran = [line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.startswith("README block ran: ")]
    assert ran == [name for name, _ in blocks], done.stdout[-2000:]


def test_declared_python_versions_are_the_readmes():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    classified = sorted(c.rsplit(":: ", 1)[1] for c in project["classifiers"] if re.search(r"Python :: 3\.\d+$", c))
    install = (ROOT / "README.md").read_text().split("### Install", 1)[1].split("\n#", 1)[0]
    named = re.search(r"Supported: Python ([\d., and]+)", install)
    assert named is not None, "the README's Install section names the supported Python versions"
    assert re.findall(r"3\.\d+", named.group(1)) == classified
    assert project["requires-python"] == f">={classified[0]}"
