"""Shared references for the tests: forward hooks, structural equality, small models.

Every reference here is independent of fxcapture: forward hooks on the real model,
the model's own forward, a manual computation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import pytest
import torch
import torch.nn as nn


def detached_copy(value: Any) -> Any:
    """A deep copy of ``value`` taken now (tensors cloned), so later in-place ops miss it."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(detached_copy(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(detached_copy(v) for v in value)
    if isinstance(value, dict):
        return type(value)((k, detached_copy(v)) for k, v in value.items())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: detached_copy(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    return value


def assert_same(actual: Any, expected: Any, *, exact: bool = True, path: str = "") -> None:
    """Structural equality: same containers, same keys, tensors ``torch.equal`` (or allclose)."""
    where = path or "value"
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: expected a tensor, got {type(actual)}"
        assert actual.shape == expected.shape, f"{where}: {actual.shape} != {expected.shape}"
        assert actual.dtype == expected.dtype, f"{where}: {actual.dtype} != {expected.dtype}"
        if exact:
            assert torch.equal(actual, expected), f"{where}: values differ"
        else:
            torch.testing.assert_close(actual, expected, msg=lambda m: f"{where}: {m}")
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: expected a dict, got {type(actual)}"
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for k in expected:
            assert_same(actual[k], expected[k], exact=exact, path=f"{where}[{k!r}]")
    elif isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)), f"{where}: expected a sequence, got {type(actual)}"
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, exact=exact, path=f"{where}[{i}]")
    elif dataclasses.is_dataclass(expected) and not isinstance(expected, type):
        assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
        for f in dataclasses.fields(expected):
            assert_same(getattr(actual, f.name), getattr(expected, f.name), exact=exact, path=f"{where}.{f.name}")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


@contextlib.contextmanager
def hooked(model: nn.Module, paths: Iterable[str]):
    """Record (a copy of) every output of the modules at ``paths``: ``{path: [call0, ...]}``."""
    modules = dict(model.named_modules())
    seen: dict[str, list[Any]] = {p: [] for p in paths}
    handles = []
    for path in seen:
        def hook(module, args, output, path=path):
            seen[path].append(detached_copy(output))

        handles.append(modules[path].register_forward_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def hook_values(model: nn.Module, paths: Iterable[str], *args: Any, **kwargs: Any):
    """Run ``model(*args, **kwargs)`` and return ``(output, {path: [outputs per call]})``."""
    with hooked(model, paths) as seen, torch.no_grad():
        out = model(*args, **kwargs)
    return out, seen


def assert_matches_hooks(feats: dict, seen: dict[str, list[Any]], *, exact: bool = True) -> None:
    """Each module path's feature(s) (``path`` or ``path@i``) equals what its hook saw."""
    for path, calls in seen.items():
        assert calls, f"the hook on {path!r} never fired"
        if len(calls) == 1:
            assert_same(feats[path], calls[0], exact=exact, path=path)
        else:
            for i, value in enumerate(calls):
                assert_same(feats[f"{path}@{i}"], value, exact=exact, path=f"{path}@{i}")


# -- one model under each tracer -------------------------------------------------------
TRACERS = ("symbolic", "running", "run time")


class ForceRunning(nn.Module):
    """``model`` behind a root whose forward counts its calls in a buffer, a write that
    torch.fx cannot follow: fxcapture traces the whole model by running it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.model(*args, **kwargs)


def under(tracer: str, model: nn.Module) -> tuple[nn.Module, Any]:
    """``(root, key)``: the module to capture for ``tracer`` and the selector (or
    module path) of the model's ``name`` in it (``"fc"``, ``":y"``, ``""``: the root)."""
    if tracer != "running":
        return model, lambda name: name
    return ForceRunning(model), lambda name: "model" + name if name[:1] in (":", "") else f"model.{name}"


def capture_under(tracer: str, root: nn.Module, names: list, example: Any, key=lambda n: n, **kwargs: Any):
    """``capture`` of ``root`` (from :func:`under`) with ``tracer``: ``fallback="never"``
    without inputs (symbolic), ``example_inputs`` (running), ``fallback="always"``."""
    from fxcapture import capture

    names = [key(n) for n in names]
    if "edit" in kwargs:
        kwargs["edit"] = {key(n): fn for n, fn in kwargs["edit"].items()}
    if tracer == "running":
        return capture(root, names, example_inputs=example, **kwargs)
    return capture(root, names, fallback="never" if tracer == "symbolic" else "always", **kwargs)


def clone_nodes(graph) -> list:
    """The ``torch.clone`` calls in an fx graph (and ``.clone()`` methods)."""
    return [
        n
        for n in graph.nodes
        if (n.op == "call_function" and n.target is torch.clone)
        or (n.op == "call_method" and n.target == "clone")
    ]


def module_state(model: nn.Module) -> dict[str, Any]:
    """A snapshot of everything that capture() must not change on ``model`` and its modules."""
    snap = {}
    for path, m in model.named_modules():
        snap[path] = {
            "dict_keys": sorted(m.__dict__),
            "forward_hooks": len(m._forward_hooks),
            "forward_pre_hooks": len(m._forward_pre_hooks),
            "backward_hooks": len(m._backward_hooks),
            "buffers": sorted(m._buffers),
            "params": sorted(m._parameters),
            "children": sorted(m._modules),
            "forward_code": type(m).forward.__code__,
            "instance_forward": m.__dict__.get("forward"),
            "training": m.training,
        }
    return snap


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def resnet18():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture
def image():
    return torch.randn(2, 3, 64, 64)


def timm_vit_small(**kwargs) -> nn.Module:
    """timm vit_small_patch16_224, random weights, fused attention off per block."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, **kwargs).eval()
    for block in model.blocks:
        block.attn.fused_attn = False
    return model


def tiny_gpt2(vocab_size: int = 100, n_embd: int = 64) -> nn.Module:
    """A 2-layer GPT-2 LM with random weights and eager attention, in eval mode."""
    import transformers

    config = transformers.GPT2Config(
        n_layer=2, n_embd=n_embd, n_head=4, vocab_size=vocab_size, n_positions=32,
        bos_token_id=0, eos_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


REPO = Path(__file__).resolve().parents[1]
# a child Python process that imports this checkout's fxcapture (and benchmarks), one thread
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                  "OMP_NUM_THREADS": "1"}  # fmt: skip


VENV_BIN = "Scripts" if os.name == "nt" else "bin"


def run_outside(command: list, cwd: Path, *, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """Run ``command`` without this checkout on the path (an installed fxcapture), one thread."""
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(c) for c in command], cwd=cwd, env={**environment, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    if check:
        assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="session")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with fxcapture's wheel installed, its dependencies taken from the
    interpreter running the tests (no download: a ``.pth`` names that interpreter's
    site folders, like ``--system-site-packages`` but also under a venv)."""
    pytest.importorskip("setuptools")  # the build backend, without build isolation
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"  # a copy: no stale build/ folder of the checkout gets packed
    shutil.copytree(REPO / "fxcapture", source / "fxcapture", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    run_outside([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", source,
                 "-w", tmp / "wheel"], cwd=tmp)  # fmt: skip
    (wheel,) = (tmp / "wheel").glob("fxcapture-*.whl")
    env = tmp / "venv"
    run_outside([sys.executable, "-m", "venv", "--without-pip", env], cwd=tmp)
    python = env / VENV_BIN / "python"
    purelib = run_outside([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp)
    sites = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]
    Path(purelib.stdout.strip(), "_test_parent_site.pth").write_text("\n".join(sites) + "\n")
    run_outside([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel], cwd=tmp)
    where = run_outside([python, "-c", "import fxcapture; print(fxcapture.__file__)"], cwd=tmp).stdout.strip()
    assert Path(where).is_relative_to(env), where  # the wheel's copy, not the checkout's
    return env


def kill_after_chunks(command: list[str], out: Path, chunks: int, env: dict, seconds: float = 120) -> None:
    """Start ``command`` (an ``extract`` job into ``out``) and SIGKILL it once ``chunks``
    complete chunks are on disk."""
    from fxcapture.dataset.storage import complete_chunks

    child = subprocess.Popen(command, env=env)
    try:
        deadline = time.monotonic() + seconds
        while len(complete_chunks(out)) < chunks:
            assert child.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, "no chunk appeared in time"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()


@pytest.fixture
def no_trace(monkeypatch):
    """Tracing fails loudly: an error a test expects was raised before any trace."""

    def traced(*args, **kwargs):
        raise AssertionError("the model was traced before the bad input was refused")

    monkeypatch.setattr("fxcapture.core.api.Extractor", traced)
    monkeypatch.setattr("fxcapture.core.api.choose_trace", traced)
