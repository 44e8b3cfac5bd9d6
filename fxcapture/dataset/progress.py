"""Progress of a run: a tqdm bar on a terminal, a log line every ``every`` seconds elsewhere.

Example::

    >>> bar = progress(None, total=5000, desc="extract")   # stderr not a terminal: log lines
    >>> bar.update(64)
    fxcapture extract: 64/5000 rows (1.3%), 210.5 rows/s, ETA 0:00:23
"""

from __future__ import annotations

import datetime
import sys
import threading
import time
from typing import Any


class NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class LogLines:
    """One line on stderr at least every ``every`` seconds: rows, rows/s, ETA (when the total is known).

    A daemon thread writes the line on a timer, so a slow batch (or a slow first call that
    traces the model) still shows that the run is alive.
    """

    def __init__(self, total: int | None, desc: str, every: float = 30.0) -> None:
        self.total, self.desc, self.every = total, desc, every
        self.rows = 0
        self.started = self.last = time.monotonic()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._timer: threading.Thread | None = None
        if every > 0:
            self._timer = threading.Thread(target=self._tick, name="fxcapture-progress", daemon=True)
            self._timer.start()

    def _tick(self) -> None:
        while not self._stopped.wait(self.every / 4):
            now = time.monotonic()
            if now - self.last >= self.every:
                self.line(now)

    def update(self, n: int) -> None:
        with self._lock:
            self.rows += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.line(now)

    def line(self, now: float | None = None) -> None:
        with self._lock:
            now = now or time.monotonic()
            self.last = now
            rows = self.rows
        rate = rows / max(1e-9, now - self.started)
        text = f"fxcapture {self.desc}: {rows}"
        if self.total:
            left = max(0, self.total - rows)
            eta = datetime.timedelta(seconds=round(left / rate)) if rate > 0 else "?"
            text += f"/{self.total} rows ({100 * rows / self.total:.1f}%), {rate:.1f} rows/s, ETA {eta}"
        else:
            text += f" rows, {rate:.1f} rows/s"
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        self._stopped.set()
        if self._timer is not None:
            self._timer.join()
        if self.rows and time.monotonic() - self.started >= self.every:
            self.line()  # a closing line for runs long enough to have logged


def progress(enabled: bool | None, total: int | None, desc: str, every: float = 30.0) -> Any:
    """``False``: nothing; ``True`` or a terminal: a tqdm bar in samples/s; otherwise log lines."""
    if enabled is False:
        return NoProgress()
    if enabled or sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError as err:
            if enabled:
                raise ImportError("progress=True needs tqdm: pip install tqdm") from err
            return LogLines(total, desc, every)
        return tqdm(total=total, unit="samples", desc=desc, dynamic_ncols=True, smoothing=0.1)
    return LogLines(total, desc, every)


def say(message: str) -> None:
    """A one-line notice on stderr (shown with progress off too: it is not progress)."""
    print(f"fxcapture: {message}", file=sys.stderr, flush=True)
