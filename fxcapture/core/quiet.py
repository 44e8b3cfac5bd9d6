"""Hold what a trace attempt writes to stderr and to torch's log handlers.

``torch.export`` prints the partial graph of a failed export to ``sys.stderr`` and logs
warnings about it. When the running tracer fails, fxcapture falls back to another
tracer and says why in ``explain()``: those lines are noise to the user. So while a
trace runs, the tracing thread's stderr writes and log records are held; they are
passed on when the trace succeeds and dropped when it fails. Other threads write
through untouched.

Example::

    >>> with hold_output() as held:
    ...     exported = torch.export.export(model, args, strict=False)
    ...     held.keep = True   # success: what it wrote goes out now
"""

from __future__ import annotations

import logging
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator


class _ThreadHeld:
    """Stands in for ``sys.stderr``: writes of threads in ``held`` are kept, others pass."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.held: dict[int, list[str]] = {}

    def write(self, text: str) -> int:
        parts = self.held.get(threading.get_ident())
        if parts is None:
            return self.stream.write(text)
        parts.append(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, isatty, fileno, ...
        return getattr(self.stream, name)


class _HoldRecords(logging.Filter):
    """A filter on one handler that keeps one thread's records instead of emitting them."""

    def __init__(self, thread: int, handler: logging.Handler, kept: list) -> None:
        super().__init__()
        self.thread, self.handler, self.kept = thread, handler, kept

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread:
            return True
        self.kept.append((self.handler, record))
        return False


class Held:
    """What :func:`hold_output` yields: set ``keep`` to pass the held output on."""

    keep = False


_LOCK = threading.Lock()  # guards the swap of sys.stderr between threads
_STDERR: _ThreadHeld | None = None


@contextmanager
def hold_output() -> Iterator[Held]:
    """Hold this thread's stderr and torch log output until the block ends; pass it on
    if ``held.keep`` was set, else drop it."""
    global _STDERR
    me, held = threading.get_ident(), Held()
    with _LOCK:
        if _STDERR is None or sys.stderr is not _STDERR:
            _STDERR = _ThreadHeld(sys.stderr)
            sys.stderr = _STDERR
        stderr = _STDERR
        stderr.held[me] = []
    kept: list[tuple[logging.Handler, logging.LogRecord]] = []
    filters = [_HoldRecords(me, handler, kept) for handler in _handlers()]
    for f in filters:
        f.handler.addFilter(f)
    try:
        yield held
    finally:
        for f in filters:
            f.handler.removeFilter(f)
        with _LOCK:
            text = stderr.held.pop(me)
            if not stderr.held and sys.stderr is stderr:  # the last holder puts stderr back
                sys.stderr = stderr.stream
                _STDERR = None
        if held.keep:
            stderr.stream.write("".join(text))
            for handler, record in kept:
                handler.handle(record)


def _handlers() -> list[logging.Handler]:
    """The handlers torch's records reach: on the ``torch`` logger, its children and the root."""
    found: list[logging.Handler] = []
    loggers = [logging.getLogger(), logging.getLogger("torch")]
    loggers += [logger for name, logger in logging.Logger.manager.loggerDict.items()
                if isinstance(logger, logging.Logger) and name.startswith("torch.")]  # fmt: skip
    for logger in loggers:
        for handler in logger.handlers:
            if handler not in found:
                found.append(handler)
    return found


__all__ = ["Held", "hold_output"]
