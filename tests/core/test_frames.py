"""Which frames' locals are the model's: decided by the model's own code, not by where
a file lives (an installed package keeps its locals; torch's and fxcapture's library
code never does). References: the eager model's own submodule outputs, seen by hooks."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from conftest import hooked
from fxcapture import capture, list_names
from fxcapture.cli.models import TinyViT
from fxcapture.core import api
from fxcapture.core.frames import FrameFilter

TINYNET = '''
import torch
import torch.nn as nn
from fxtest_helpers import double


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        hidden = self.lin(x)
        gate = torch.sigmoid(hidden)
        return double(hidden * gate)
'''
HELPERS = '''
def double(x):
    doubled = x * 2
    return doubled
'''


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """``fxtest_tinynet`` (a package defining a model) and ``fxtest_helpers`` (a module
    it calls), both in a ``site-packages`` folder on ``sys.path``."""
    site = tmp_path / "lib" / "site-packages"
    (site / "fxtest_tinynet").mkdir(parents=True)
    (site / "fxtest_tinynet" / "__init__.py").write_text(textwrap.dedent(TINYNET))
    (site / "fxtest_helpers.py").write_text(textwrap.dedent(HELPERS))
    monkeypatch.syspath_prepend(str(site))
    try:
        yield importlib.import_module("fxtest_tinynet"), importlib.import_module("fxtest_helpers")
    finally:
        for name in ("fxtest_tinynet", "fxtest_helpers"):
            sys.modules.pop(name, None)


@pytest.mark.parametrize("fallback", ["never", "always"])
def test_an_installed_package_keeps_its_locals(installed, fallback):
    tinynet, _ = installed
    torch.manual_seed(0)
    model = tinynet.TinyNet().eval()
    extractor = capture(model, ["hidden", "gate"], fallback=fallback)
    for _ in range(3):
        x = torch.randn(2, 4)
        with hooked(model, ["lin"]) as seen, torch.no_grad():
            expected = model(x)
        out, feats = extractor(x)
        assert torch.equal(out, expected)
        assert torch.equal(feats[":hidden"], seen["lin"][0])
        assert torch.equal(feats[":gate"], torch.sigmoid(seen["lin"][0]))


def test_only_the_models_packages_are_watched(installed):
    tinynet, helpers = installed
    model = tinynet.TinyNet()
    frames = FrameFilter(model)
    assert frames.watches(tinynet.TinyNet.forward.__code__)
    # an installed package that defines none of the model's classes is library code
    assert not frames.watches(helpers.double.__code__)
    assert "doubled" not in {info.variable for info in list_names(model, kinds=["local"])}
    # torch and fxcapture's library never, though the model is made of torch modules
    assert not frames.watches(nn.Linear.forward.__code__)
    assert not frames.watches(api.capture.__code__)


def test_fxcapture_command_line_models_are_model_code():
    frames = FrameFilter(TinyViT())
    assert frames.watches(type(TinyViT().blocks[0].attn).forward.__code__)
    assert not frames.watches(api.capture.__code__)


def test_typed_code_and_scripts_are_model_code(tmp_path):
    frames = FrameFilter(nn.Linear(2, 2))
    namespace: dict = {}
    exec(compile("def f(x):\n    y = x\n    return y\n", "<string>", "exec"), namespace)
    assert frames.watches(namespace["f"].__code__)
    script = tmp_path / "train.py"
    script.write_text("def step(x):\n    return x\n")
    exec(compile(script.read_text(), str(script), "exec"), namespace)
    assert frames.watches(namespace["step"].__code__)
    assert not frames.watches((lambda x: x).__code__)  # lambdas and comprehensions never
