"""Files that are whole or absent: written beside their place, then renamed onto it.

Example::

    >>> with atomic_file("out/model.pt") as tmp:
    ...     torch.save(obj, tmp)
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator

TMP_PREFIX = ".tmp-"  # every temp file fxcapture makes starts with it (cleanup finds them)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _create_exclusive(path: Path) -> None:
    """Create ``path`` empty; fail if anything (a symlink too) is already there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666)
    os.close(fd)


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    try:
        fd = os.open(path, flags | _NOFOLLOW)
    except OSError:  # a folder some systems cannot open (Windows): durability is best effort
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block has written it, it is
    fsynced and renamed onto ``path``. A crash or Ctrl-C leaves the old file (or none),
    never a half-written one.

    The temp file is ``.tmp-<name>-<random>``: created empty with ``O_EXCL |
    O_NOFOLLOW`` under an unpredictable name (nobody can plant a symlink there first),
    and removed when the block fails. ``path`` itself is replaced, never followed,
    when it is a symlink.

    Example::

        >>> with atomic_file("out/model.pt") as tmp:
        ...     torch.save(obj, tmp)
    """
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{secrets.token_hex(8)}")
    _create_exclusive(tmp)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)  # the rename itself survives a power loss
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
