"""Progress without a terminal: log lines on a timer, not only when a batch ends."""

from __future__ import annotations

import threading
import time

from fxcapture.dataset.progress import LogLines, progress


def test_a_slow_batch_still_gets_a_line_on_the_timer(capsys):
    bar = progress(None, total=100, desc="extract", every=0.2)  # pytest's stderr is not a terminal
    assert isinstance(bar, LogLines)
    time.sleep(0.7)  # no update at all: a first call tracing the model, or one slow batch
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 2 and all(line.startswith("fxcapture extract: 0/100 rows (0.0%)") for line in lines)
    bar.update(50)
    time.sleep(0.35)
    bar.close()
    after = capsys.readouterr().err.splitlines()
    assert any(line.startswith("fxcapture extract: 50/100 rows (50.0%)") and "ETA" in line for line in after)
    assert not any(t.name == "fxcapture-progress" for t in threading.enumerate())  # close stops the timer


def test_lines_are_spaced_by_the_interval(capsys):
    bar = LogLines(total=None, desc="extract", every=0.3)
    for _ in range(20):
        bar.update(1)
        time.sleep(0.05)  # a second of fast batches
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert 2 <= len(lines) <= 5, lines  # about one per 0.3 s plus the closing line, not one per batch
    assert lines[-1].startswith("fxcapture extract: 20 rows") and "rows/s" in lines[-1]
