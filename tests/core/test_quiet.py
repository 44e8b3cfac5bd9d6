"""A failed trace attempt leaves no noise on stderr; other threads' output is untouched."""

from __future__ import annotations

import logging
import sys
import threading

import torch
import torch.nn as nn

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
