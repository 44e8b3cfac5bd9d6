"""examples/monitor_training.py, both ways (the model itself; monitor.model), against a
plain training run of the same seed with a forward hook on ``head``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import hooked

from fxcapture.cli.models import TinyViT

PATH = Path(__file__).resolve().parents[2] / "examples" / "monitor_training.py"


def example():
    spec = importlib.util.spec_from_file_location("monitor_training", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_logits(data) -> dict:
    """The example's training without a monitor; the logits a hook on ``head`` sees."""
    torch.manual_seed(0)
    model = TinyViT(image_size=32, patch=8, dim=32, depth=2, heads=2, num_classes=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    logits = {}
    with hooked(model, ["head"]) as seen:
        for epoch in range(3):
            for batch_idx, (x, y) in enumerate(data):
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                logits[(epoch, batch_idx)] = seen["head"][-1]
    return logits


@pytest.fixture(scope="module")
def expected():
    return reference_logits(example().synthetic_data(num_batches=8))


@pytest.mark.parametrize("way", ["--model-itself", "--monitor-model"])
def test_monitor_training_example(tmp_path, way, capsys, expected):
    argv = ["--out", str(tmp_path)] + ([way] if way == "--model-itself" else [])
    loaded = example().main(argv)
    got = loaded["logits"]["data"]
    assert list(got) == [(e, b) for e in (0, 2) for b in range(8)]
    for position, value in got.items():
        torch.testing.assert_close(value, expected[position], rtol=1e-5, atol=1e-6)
    assert ("attention" in loaded) == (way == "--monitor-model")
    assert "loaded back" in capsys.readouterr().out
