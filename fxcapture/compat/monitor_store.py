"""Saving and loading what a :class:`~fxcapture.compat.monitor.Monitor` recorded.

The training monitor doc's files: one ``torch.save`` item per recorded output,
``{"epoch", "batch_idx", "layer", "alias", "output_shape", "output"}``, written as
``<output_dir>/<alias>/single_epoch{e}_batch{b}.pt`` (one item) and
``<output_dir>/<alias>/epoch_full_epoch{e}.pt`` (a list of items in batch order).
Nothing is written or read outside ``output_dir``: aliases and file names that are
paths are refused, folders or files that resolve elsewhere (symlinks) too, and every
file is written through :func:`fxcapture._util.atomic.atomic_file`.

Example::

    >>> save_single(Path("runs"), monitor.get_single_data())
    [PosixPath('runs/attention/single_epoch0_batch0.pt')]
    >>> load("runs")["attention"]["data"][(0, 0)].shape
    torch.Size([2, 2, 5, 5])
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from .._util.atomic import TMP_PREFIX, atomic_file
from ..dataset.files import make_dirs, write_error

RECORD_TYPES = ("single", "epoch_full")
_PATTERNS = {"single": "single_epoch*_batch*.pt", "epoch_full": "epoch_full_epoch*.pt"}


def output_shape(value: Any) -> Any:
    """A tensor's shape as a list; tuples/lists give a list of shapes, dicts a dict."""
    if isinstance(value, torch.Tensor):
        return list(value.shape)
    if isinstance(value, (tuple, list)):
        return [output_shape(v) for v in value]
    if isinstance(value, dict):
        return {k: output_shape(v) for k, v in value.items()}
    return None


# -- names that stay inside output_dir ---------------------------------------------------
def check_name(name: Any, what: str) -> str:
    """``name`` as one plain path component, or a ValueError saying why not.

    Example::

        >>> check_name("../x", "alias")
        Traceback (most recent call last):
        ValueError: alias '../x' is a path: ...
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty string, got {name!r}")
    if any(c in name for c in "/\\\0") or name in (".", "..") or Path(name).is_absolute():
        raise ValueError(
            f"{what} {name!r} is a path: it would be written outside output_dir. "
            "Use a plain name (letters, digits, '.', '_', '-'), e.g. 'attention'"
        )
    if name.startswith(TMP_PREFIX):
        raise ValueError(f"{what} {name!r} starts with {TMP_PREFIX!r}, reserved for temp files")
    return name


def folder_name(alias: str) -> str:
    """The folder of ``alias`` under output_dir (portable characters only)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", check_name(alias, "alias"))


def check_folders(aliases: list[str]) -> None:
    """Refuse aliases that are paths, or that would share a folder."""
    seen: dict[str, str] = {}
    for alias in aliases:
        folder = folder_name(alias)
        if folder in seen:
            raise ValueError(
                f"aliases {seen[folder]!r} and {alias!r} would be saved into the same folder "
                f"{folder!r}; give one of them another alias"
            )
        seen[folder] = alias


def _inside(root: Path, path: Path) -> Path:
    """``path`` if it resolves inside ``root`` (symlinks followed), else a ValueError."""
    resolved, top = path.resolve(), root.resolve()
    if resolved != top and top not in resolved.parents:
        raise ValueError(
            f"{path} resolves to {resolved}, outside the output folder {top}; "
            "remove the link or choose another output_dir"
        )
    return path


def _dir(output_dir: Path, alias: str) -> Path:
    path = _inside(output_dir, output_dir / folder_name(alias))
    make_dirs(path)
    return _inside(output_dir, path)


def _save(obj: Any, root: Path, path: Path) -> Path:
    """``torch.save`` through a temp file; never leaves a half-written file."""
    _inside(root, path)
    try:
        with atomic_file(path) as tmp:
            torch.save(obj, tmp)
    except OSError as err:
        raise write_error(path, err) from err
    return path


# -- saving ---------------------------------------------------------------------------
def _item(entry: dict, epoch: int, batch_idx: int, value: Any) -> dict[str, Any]:
    layer = entry["layer"] if isinstance(entry["layer"], str) else repr(entry["layer"])
    return {"epoch": epoch, "batch_idx": batch_idx, "layer": layer, "alias": entry["alias"],
            "output_shape": output_shape(value), "output": value}  # fmt: skip


def save_single(output_dir: Path, data: dict[str, dict]) -> list[Path]:
    """One file per alias and (epoch, batch) of ``data`` (``get_single_data()``)."""
    written = []
    for alias, entry in data.items():
        for (epoch, batch_idx), value in entry["data"].items():
            path = _dir(output_dir, alias) / f"single_epoch{epoch}_batch{batch_idx}.pt"
            written.append(_save(_item(entry, epoch, batch_idx, value), output_dir, path))
    return written


def save_epoch(output_dir: Path, data: dict[str, dict]) -> list[Path]:
    """One file per alias and epoch of ``data`` (``get_epoch_data()``), items in batch order."""
    written = []
    for alias, entry in data.items():
        by_epoch: dict[int, list] = {}
        for (epoch, batch_idx), value in entry["data"].items():
            by_epoch.setdefault(epoch, []).append(_item(entry, epoch, batch_idx, value))
        for epoch, items in by_epoch.items():
            path = _dir(output_dir, alias) / f"epoch_full_epoch{epoch}.pt"
            written.append(_save(items, output_dir, path))
    return written


def save_custom(output_dir: Path, obj: Any, filename: str) -> Path:
    """``torch.save(obj)`` to ``<output_dir>/<filename>``; ``filename`` is a plain name."""
    check_name(filename, "filename")
    make_dirs(output_dir)
    return _save(obj, output_dir, output_dir / filename)


# -- loading --------------------------------------------------------------------------
def _file_order(path: Path) -> tuple:
    return tuple(int(n) for n in re.findall(r"\d+", path.name))


def load(output_dir: str | Path, record_type: str = "single") -> dict[str, dict]:
    """What :func:`save_single` (or :func:`save_epoch`, ``record_type="epoch_full"``)
    wrote, as ``{alias: {"layer", "alias", "output_shape", "data": {(epoch, batch): value}}}``.

    A missing folder, or one without files of ``record_type``, is an error.
    """
    if record_type not in RECORD_TYPES:
        raise ValueError(f"record_type must be 'single' or 'epoch_full', got {record_type!r}")
    root = Path(output_dir)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise FileNotFoundError(f"Monitor.load: {root} {what}; give the output_dir the "
                                "monitor saved into")  # fmt: skip
    files = sorted(root.glob(f"*/{_PATTERNS[record_type]}"), key=_file_order)
    if not files:
        other = [t for t in RECORD_TYPES
                 if t != record_type and any(root.glob(f"*/{_PATTERNS[t]}"))]  # fmt: skip
        hint = f"; it has {other[0]!r} files: Monitor.load(..., {other[0]!r})" if other else ""
        raise FileNotFoundError(f"Monitor.load: no {record_type!r} outputs in {root}{hint}")
    result: dict[str, dict] = {}
    for path in files:
        loaded = torch.load(_inside(root, path), map_location="cpu", weights_only=True)
        for item in loaded if isinstance(loaded, list) else [loaded]:
            entry = result.setdefault(item["alias"], {
                "layer": item["layer"], "alias": item["alias"],
                "output_shape": item["output_shape"], "data": {},
            })  # fmt: skip
            entry["data"][(item["epoch"], item["batch_idx"])] = item["output"]
    for entry in result.values():
        entry["data"] = dict(sorted(entry["data"].items()))
    return result
