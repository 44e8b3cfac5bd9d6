"""The package as a user gets it: a wheel installed (not editable) into a fresh venv,
run from outside the checkout. The README's first command works, the demo model keeps
its locals (an installed package's model is the model's code, wherever it lives), the
examples run; and the declared Python versions are the ones the README names."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fxcapture.cli.models import Attention, TinyViT
from test_readme import readme_blocks

ROOT = Path(__file__).resolve().parents[1]
BIN = "Scripts" if os.name == "nt" else "bin"


def _run(command: list, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing from the checkout
    done = subprocess.run([str(c) for c in command], cwd=cwd, env={**environment, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with fxcapture's wheel installed, its dependencies taken from the
    interpreter running the tests (no download: a ``.pth`` names that interpreter's
    site folders, like ``--system-site-packages`` but also under a venv)."""
    pytest.importorskip("setuptools")  # the build backend, without build isolation
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"  # a copy: no stale build/ folder of the checkout gets packed
    shutil.copytree(ROOT / "fxcapture", source / "fxcapture", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", source, "-w", tmp / "wheel"],
         cwd=tmp)  # fmt: skip
    (wheel,) = (tmp / "wheel").glob("fxcapture-*.whl")
    env = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", env], cwd=tmp)
    python = env / BIN / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout.strip()
    sites = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]
    Path(purelib, "_test_parent_site.pth").write_text("\n".join(sites) + "\n")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel], cwd=tmp)
    where = _run([python, "-c", "import fxcapture; print(fxcapture.__file__)"], cwd=tmp).stdout.strip()
    assert Path(where).is_relative_to(env), where  # the wheel's copy, not the checkout's
    return env


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
@pytest.mark.parametrize("script, says", [
    ("activation_patching.py", "zero-ablating one head"),
    ("monitor_training.py", "blocks.1.attn:attn"),
])  # fmt: skip
def test_examples_run_from_the_installed_wheel(venv, tmp_path, script, says):
    done = _run([venv / BIN / "python", ROOT / "examples" / script], cwd=tmp_path, TMPDIR=str(tmp_path))
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
