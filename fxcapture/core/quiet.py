"""Hold what a trace attempt logs through torch's loggers.

When the running tracer fails, fxcapture falls back to another tracer and says why in
``explain()``: the warnings and errors torch logged about the failed attempt are noise
to the user. So while a trace runs, the log records of the tracing thread are held on
the handlers they reach (a filter per handler); they are passed on when the trace
succeeds and dropped when it fails. Records of other threads pass at once, and nothing
process-wide (``sys.stderr``) is replaced. The partial graph ``torch.export`` prints
with ``print`` is not a log record: the running tracer exports without that print
(:func:`.internals.export_quietly`).

Example::

    >>> with hold_output() as held:
    ...     exported = export_quietly(model, args, {}, None)
    ...     held.keep = True   # success: what it logged goes out now
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Iterator


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


@contextmanager
def hold_output() -> Iterator[Held]:
    """Hold this thread's torch log records until the block ends; pass them on if
    ``held.keep`` was set, else drop them."""
    held, kept = Held(), []
    filters = [_HoldRecords(threading.get_ident(), handler, kept) for handler in _handlers()]
    for f in filters:
        f.handler.addFilter(f)
    try:
        yield held
    finally:
        for f in filters:
            f.handler.removeFilter(f)
        if held.keep:
            for handler, record in kept:
                handler.handle(record)


def _handlers() -> list[logging.Handler]:
    """The handlers torch's records reach: on the ``torch`` logger, its children and the root."""
    found: list[logging.Handler] = []
    loggers = [logging.getLogger(), logging.getLogger("torch")]
    loggers += [logger for name, logger in list(logging.Logger.manager.loggerDict.items())
                if isinstance(logger, logging.Logger) and name.startswith("torch.")]  # fmt: skip
    for logger in loggers:
        for handler in logger.handlers:
            if handler not in found:
                found.append(handler)
    return found


__all__ = ["Held", "hold_output"]
