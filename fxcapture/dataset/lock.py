"""One writer per output folder: an OS file lock (``flock``) on ``out/.fxcapture.lock``.

The kernel drops the lock when its process ends, however it ends, so the lock of a
killed run is simply taken over by the next one; the file holds the writer's host and
pid for the message a second writer gets. The lock is the writer's alone: its file
descriptor is closed on ``exec`` and in every child ``fork`` makes (DataLoader workers),
so a worker that outlives a failed run cannot keep the folder locked.

Example::

    >>> with OutputLock(Path("feats")):
    ...     ...                     # no other fxcapture process writes feats/ meanwhile
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
from pathlib import Path

from .files import write_error

LOCK_NAME = ".fxcapture.lock"
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

# descriptors of the locks this process holds, closed in forked children
_HELD: set[int] = set()
_HELD_LOCK = threading.Lock()


def _close_held_in_child() -> None:
    # a flock belongs to the open file, shared with every forked copy of the descriptor:
    # the child drops its copy (no lock to take: the child runs one thread)
    for fd in tuple(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


class OutputLockedError(BlockingIOError):
    """Another process is writing the output folder."""


class OutputLock:
    """An exclusive, non-blocking ``flock`` on ``folder/.fxcapture.lock`` (created if needed)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC, 0o644)
        except OSError as err:
            raise write_error(self.path, err) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputLockedError(
                f"{self.folder} is being written by another fxcapture run ({holder}); wait for it "
                "to finish, or choose another output folder"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        with _HELD_LOCK:
            _HELD.add(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with _HELD_LOCK:
                _HELD.discard(fd)
            os.close(fd)  # closing drops the flock; the file stays (removing it would race)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
