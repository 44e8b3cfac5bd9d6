"""A failed trace attempt leaves no noise on stderr; other threads' output is untouched."""

from __future__ import annotations

import logging
import sys
import threading
import warnings

import torch
import torch.nn as nn

from conftest import assert_matches_hooks, hook_values, tiny_gpt2
from fxcapture import capture
from fxcapture.core.quiet import hold_output


class DataDependent(nn.Module):
    """No tracer follows ``if h.sum() > 0``: the running tracer fails, run-time capture takes over."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 0:
            h = self.b(h)
        gate = torch.sigmoid(h)
        return gate * 2


def test_a_failed_running_trace_prints_nothing(capfd):
    torch.manual_seed(0)
    model = DataDependent()
    ex = capture(model, ["a", "gate"])
    for _ in range(3):
        x = torch.randn(2, 4)
        out, feats = ex(x)
        assert torch.equal(out, model(x))  # the model's own answer, either branch
        assert set(feats) == {"a", ":gate"}
    captured = capfd.readouterr()
    assert "def forward" not in captured.err + captured.out  # torch.export's partial graph
    assert "Unable to find user code" not in captured.err
    assert "GuardOnDataDependentSymNode" in ex.explain()  # the reason is kept where it is asked for


def test_held_records_are_dropped_or_passed_on_and_other_threads_log_through(capsys):
    logger = logging.getLogger("torch.fxcapture_test")
    handler = logging.StreamHandler(sys.stdout)
    logger.addHandler(handler)
    try:
        before = sys.stderr
        with hold_output():
            assert sys.stderr is before  # nothing process-wide is replaced
            logger.warning("dropped record")
            other = threading.Thread(target=lambda: logger.warning("other thread"))
            other.start()
            other.join()
            print("the thread's own print", file=sys.stdout, flush=True)
        with hold_output() as held:
            logger.warning("kept record")
            held.keep = True
    finally:
        logger.removeHandler(handler)
    out = capsys.readouterr().out.splitlines()
    assert "dropped record" not in out
    # written through at once (before the block ended), the kept record replayed at its end
    assert out == ["other thread", "the thread's own print", "kept record"]


def test_a_first_call_at_batch_1_prints_nothing_and_later_batches_stay_exact(capfd, caplog):
    """torch.export specializes a dimension of size 1 with a "0/1 specialized" warning:
    it stays static instead, and another batch size traces again, equal to the model."""
    model = tiny_gpt2()
    ex = capture(model, ["transformer.h.1"])
    ids = torch.randint(0, 100, (1, 8))
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        out, feats = ex(ids)
    printed = capfd.readouterr()
    assert ex.tracer == "running"
    assert not [str(w.message) for w in caught]
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "specializ" not in printed.err + printed.out and printed.err == ""
    for batch in (1, 3, 1, 2):
        ids = torch.randint(0, 100, (batch, 8))
        out, feats = ex(ids)
        ref, seen = hook_values(model, ["transformer.h.1"], ids)
        assert torch.equal(out.logits, ref.logits)
        assert_matches_hooks(feats, seen)
