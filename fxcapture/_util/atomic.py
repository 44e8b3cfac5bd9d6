"""Files that are whole or absent: written beside their place, then renamed onto it.

Example::

    >>> with atomic_file("out/model.pt") as tmp:
    ...     torch.save(obj, tmp)
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block has written it, it is
    fsynced and renamed onto ``path``. A crash or Ctrl-C leaves the old file (or none),
    never a half-written one.

    Example::

        >>> with atomic_file("out/model.pt") as tmp:
        ...     torch.save(obj, tmp)
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{threading.get_ident()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
