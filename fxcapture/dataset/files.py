"""Files that fxcapture owns inside an output folder, and nothing outside it.

Every file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` under an unpredictable
temporary name of fxcapture's own pattern (``.fxcapture-tmp-<what>-<random>``), then
renamed into place; names read back from an index or a manifest are validated as
plain names before they are joined to the folder. A later run recognises the
temporaries of a killed one by their pattern and removes them.

Example::

    >>> with private_temp(Path("out"), "run.json") as (tmp, f):
    ...     f.write(b"{}")
    >>> os.replace(tmp, "out/run.json")
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import stat
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping

import numpy as np

TMP_PREFIX = ".fxcapture-tmp-"
_OLD_TMP = re.compile(r"^\.tmp-")  # temporaries of format version 1 (and of atomic_file)
_PLAIN = re.compile(r"^[A-Za-z0-9_@][A-Za-z0-9._@-]{0,254}$")
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class WriteError(OSError):
    """Writing a file of an output failed; the message names the file and the cause."""

    def __str__(self) -> str:
        return str(self.strerror)


def is_own_temp(name: str) -> bool:
    """Is ``name`` a temporary file or folder fxcapture (this or an older version) writes?"""
    return name.startswith(TMP_PREFIX) or bool(_OLD_TMP.match(name))


def plain_name(name: Any, what: str, source: Path) -> str:
    """``name`` if it is one plain file name (no separator, no ``..``); a clear error otherwise."""
    if not isinstance(name, str) or not _PLAIN.match(name) or name in (".", ".."):
        raise ValueError(
            f"{source} names {what} {name!r}, which is not a plain file name inside the output "
            "folder: the file was edited or crafted; refusing to follow it"
        )
    return name


def regular_file(path: Path) -> os.stat_result:
    """``lstat`` of ``path``, which must be a regular file (not a link): a clear error otherwise."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: the output is incomplete or was edited") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} is not a regular file (a link or a folder?): refusing to follow it")
    return st


def real_dir(path: Path) -> bool:
    """Is ``path`` a folder that is not a symbolic link?"""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def private_temp(folder: Path, what: str) -> Iterator[tuple[Path, BinaryIO]]:
    """A new file ``folder/.fxcapture-tmp-<what>-<random>`` opened for writing, created
    exclusively and never through a link; removed again if the block fails."""
    path = folder / f"{TMP_PREFIX}{what}-{secrets.token_hex(8)}"
    f = create_file(path)
    try:
        with f:
            yield path, f
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise


def create_file(path: Path) -> BinaryIO:
    """Open a new file for writing: fails if anything (a link too) is already there."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o644)
    except OSError as err:
        raise write_error(path, err) from err
    return os.fdopen(fd, "wb")


def make_private_dir(folder: Path, what: str) -> Path:
    """A new folder ``folder/.fxcapture-tmp-<what>-<random>`` (``mkdir`` never follows a link)."""
    path = folder / f"{TMP_PREFIX}{what}-{secrets.token_hex(8)}"
    try:
        os.mkdir(path, 0o755)
    except OSError as err:
        raise write_error(path, err) from err
    return path


def make_dirs(path: Path) -> None:
    """``mkdir -p path``; a failure (a file in the way, no permission, a read-only file
    system) is a :class:`WriteError` naming the path."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(Path(path), err) from err


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically: a private temporary, fsynced, renamed onto it."""
    text = json.dumps(data, indent=1, default=str).encode() + b"\n"
    try:
        with private_temp(path.parent, path.name) as (tmp, f):
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except WriteError:
        raise
    except OSError as err:
        raise write_error(path, err, len(text)) from err


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` (not through a link); errors name the file."""
    regular_file(path)
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): the file is corrupt") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object: the file is corrupt")
    return data


def crc32(data: Any, value: int = 0) -> int:
    """A running CRC-32 of a buffer (cheap: about a GB/s)."""
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return zlib.crc32(data, value)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def check_space(folder: Path, needed: int, what: str) -> None:
    """Raise ``WriteError(ENOSPC)`` when ``folder``'s file system has less than ``needed`` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise WriteError(
            errno.ENOSPC,
            f"no space left on device for {what} in {folder}: {human_bytes(needed)} needed, "
            f"{human_bytes(free)} free; free some space or choose another output folder",
        )


def check_output_folder(out: Any, what: str = "out") -> Path:
    """``out`` as a ``Path`` once it can be an output folder: a folder, or a path that can be
    made one (its nearest existing parent a writable folder on a writable file system).
    Cheap, so it runs before any model or data is touched; errors name the path and the fix.
    ``what`` names the argument: ``"out"`` (Python) or ``"--out"`` (the command line).

    Example::

        >>> check_output_folder("/etc/passwd")
        FileExistsError: out='/etc/passwd' is a file, not a folder: choose a new or empty folder
    """
    if out is None or not isinstance(out, (str, os.PathLike)) or not str(out):
        raise TypeError(f"{what}={out!r}: give the output folder as a path, e.g. {what}='features/'")
    path = Path(out)
    label = f"{what} {path}" if what.startswith("-") else f"{what}={str(path)!r}"
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{label} is a file, not a folder: choose a new or empty folder")
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise WriteError(errno.ENOTDIR, f"cannot create {label}: {parent} is a file, not a folder")
    if getattr(os, "ST_RDONLY", 0) and os.statvfs(parent).f_flag & os.ST_RDONLY:
        raise WriteError(errno.EROFS, f"cannot write {label}: {parent} is on a read-only file system")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise WriteError(errno.EACCES, f"cannot write {label}: permission denied in {parent}; choose another folder")
    if parent != path:  # try making a folder there (some file systems refuse what access() allows);
        # a name of its own: another process (a second rank) may be making the same --out now
        probe = parent / f"{TMP_PREFIX}probe-{secrets.token_hex(8)}"
        try:
            os.mkdir(probe)
            os.rmdir(probe)
        except OSError as err:
            cause = os.strerror(err.errno).lower() if err.errno else str(err)
            raise WriteError(err.errno or errno.EIO, f"cannot create {label}: making {probe} failed: {cause}") from None
    return path


def check_output_file(path: Any, what: str) -> Path:
    """``path`` as a ``Path`` once a file can be written there (not a folder; its folder
    writable or creatable, see :func:`check_output_folder`)."""
    found = Path(check_output_folder(Path(path).parent, what).joinpath(Path(path).name))
    if found.is_dir():
        raise IsADirectoryError(f"{what} {str(path)!r} is a folder: give a file name, e.g. {Path(path) / 'out.svg'}")
    return found


def write_error(path: Path, err: OSError, needed: int | None = None) -> WriteError:
    """A ``WriteError`` naming ``path`` and the cause in words."""
    if isinstance(err, WriteError):
        return err
    cause = os.strerror(err.errno).lower() if err.errno else str(err)
    if err.errno == errno.ENOSPC and needed is not None:
        cause += f": {human_bytes(needed)} needed"
    elif err.errno == errno.ENAMETOOLONG:
        cause += f" ({len(path.name)} characters)"
    elif err.errno == errno.EEXIST or err.errno == errno.ELOOP:
        cause += " (refusing to write through an existing file or link)"
    return WriteError(err.errno or errno.EIO, f"writing {path} failed: {cause}")
