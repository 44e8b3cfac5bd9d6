"""The state of an output folder: what a run finds there, prepares, resumes and finishes.

``run.json`` (the run's identity) is written first, complete chunks accumulate under
``chunks/``, and :func:`finalize` writes ``manifest.json`` (last) listing them: no data
is copied. Only what fxcapture wrote is ever removed.

Example::

    >>> prepare_output(Path("feats"), config, resume=True, overwrite=False)
    'run'
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from .files import check_space, is_own_temp, make_dirs, plain_name, read_json, real_dir, regular_file, write_json
from .lock import LOCK_NAME
from .writer import CHUNK_RE, CHUNKS, INDEX

FORMAT = "fxcapture.features"
VERSION = 2
MANIFEST = "manifest.json"
RUN = "run.json"


class UnfinishedOutputError(RuntimeError):
    """``load`` was given an output whose run has not finished (no manifest yet)."""


def config_hash(config: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-able configuration."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    parts = [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in keys[:4]]
    return "; ".join(parts) + ("; ..." if len(keys) > 4 else "")


def _only_own_leftovers(out: Path) -> bool:
    """Does ``out`` hold nothing but fxcapture's lock, temporaries and an empty ``chunks/``?"""
    for path in out.iterdir():
        if path.name == LOCK_NAME or is_own_temp(path.name):
            continue
        if path.name == CHUNKS and real_dir(path) and all(is_own_temp(p.name) for p in path.iterdir()):
            continue
        return False
    return True


def existing_config(out: Path) -> tuple[str, dict[str, Any]] | None:
    """``("finished" | "unfinished", config)`` of an fxcapture output; ``None`` if ``out`` is
    absent, empty, or holds only fxcapture's own leftovers (a killed run's temporaries).

    Raises ``FileExistsError`` for a non-empty directory (or a file) that is not one.
    """
    if not out.exists():
        return None
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another output path")
    if (out / MANIFEST).exists():
        return "finished", read_json(out / MANIFEST).get("config", {})
    if (out / RUN).exists():
        return "unfinished", read_json(out / RUN).get("config", {})
    if _only_own_leftovers(out):
        return None
    raise FileExistsError(
        f"{out} is not empty and is not an fxcapture output (no {MANIFEST} or {RUN}); "
        "choose a new or empty output directory"
    )


def prepare_output(out: Path, config: dict[str, Any], *, resume: bool, overwrite: bool, primary: bool = True,
                   not_resumable: str | None = None) -> str:  # fmt: skip
    """Check ``out`` against ``config``; return ``"finished"`` (nothing to do) or ``"run"``.

    Only the ``primary`` process (rank 0, holding the folder's lock) changes the folder:
    it removes fxcapture's leftovers, an old output when ``overwrite``, and writes
    ``run.json`` for a new run. ``not_resumable`` says why the data cannot be resumed
    (a shuffled loader, a generator): an unfinished run of it is refused.
    """
    state = existing_config(out)
    if state is not None and state[0] == "unfinished" and not complete_chunks(out):
        overwrite = True  # a run that stopped before its first chunk: nothing to keep
    if state is not None and state[0] == "unfinished" and read_json(out / RUN).get("version") != VERSION:
        overwrite = True  # chunks of an older format: computed again, in this one
    if state is not None and not overwrite:
        kind, old = state
        if config_hash(old) != config_hash(config):
            what = "an unfinished run" if kind == "unfinished" else "a finished output"
            raise FileExistsError(
                f"{out} holds {what} of another configuration ({_differences(old, config)}). Pass "
                "overwrite=True (--overwrite) to replace it, or choose another output directory."
            )
        if kind == "finished":
            if primary:  # a kill between the manifest and the end of finalize
                (out / RUN).unlink(missing_ok=True)
                remove_own_temporaries(out)
            return "finished"
        if not resume:
            raise FileExistsError(
                f"{out} holds an unfinished run of the same configuration: resume=True continues "
                "it, overwrite=True (--overwrite) starts it again"
            )
        if not_resumable:
            raise ValueError(
                f"{out} holds an unfinished run, but it cannot be resumed: {not_resumable}. Resuming "
                "would mix rows of two orders; pass overwrite=True (--overwrite) to start again, or "
                "give a Dataset or a sequential DataLoader (resumed by sample index)"
            )
    if primary:
        if state is not None and overwrite:
            remove_output(out)
        make_dirs(out)
        remove_own_temporaries(out)
        if not (out / RUN).exists():
            check_space(out, 64 << 10, RUN)
            write_json(out / RUN, {"format": FORMAT, "version": VERSION, "config": config,
                                   "config_hash": config_hash(config)})  # fmt: skip
        if not real_dir(out / CHUNKS):
            if (out / CHUNKS).is_symlink():
                raise FileExistsError(f"{out / CHUNKS} is a link: fxcapture writes only inside {out}")
            make_dirs(out / CHUNKS)
    return "run"


def remove_own_temporaries(out: Path) -> None:
    """Remove fxcapture's temporary files at the top of ``out`` (never following links)."""
    for path in out.iterdir():
        if is_own_temp(path.name):
            _remove(path)


def _remove(path: Path) -> None:
    if real_dir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_output(out: Path) -> None:
    """Remove what fxcapture wrote into ``out`` (manifest, run file, chunks, arrays of a
    version 1 output, temporaries); the user's own files stay."""
    manifest = out / MANIFEST
    if manifest.exists():
        with_files = read_json(manifest)
        if with_files.get("version") == 1:  # one .npy per key at the top
            for entry in with_files.get("arrays", {}).values():
                name = plain_name(entry.get("file"), "an array file", manifest)
                (out / name).unlink(missing_ok=True)
        manifest.unlink()
    (out / RUN).unlink(missing_ok=True)
    remove_own_temporaries(out)
    if real_dir(out / CHUNKS):
        for path in (out / CHUNKS).iterdir():
            if CHUNK_RE.match(path.name) or is_own_temp(path.name):
                _remove(path)
        if not any((out / CHUNKS).iterdir()):
            (out / CHUNKS).rmdir()


# -- chunks -------------------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    start: int
    stop: int
    path: Path


def complete_chunks(out: Path) -> list[Chunk]:
    """The complete chunks under ``out`` (real folders, not links), by start row."""
    folder = Path(out) / CHUNKS
    if not real_dir(folder):
        return []
    found = []
    for path in folder.iterdir():
        m = CHUNK_RE.match(path.name)
        if m and real_dir(path):
            found.append(Chunk(int(m.group(1)), int(m.group(2)), path))
    return sorted(found, key=lambda c: c.start)


def remove_temporaries(out: Path, lo: int = 0, hi: int | None = None) -> None:
    """Remove temporary chunk folders of killed runs whose rows start in ``[lo, hi)``."""
    folder = Path(out) / CHUNKS
    if not real_dir(folder):
        return
    for path in folder.iterdir():
        if not is_own_temp(path.name):
            continue
        digits = path.name.rsplit("tmp-", 1)[-1][:12]
        start = int(digits) if digits.isdigit() else lo
        if lo <= start and (hi is None or start < hi):
            _remove(path)


def uncovered(chunks: Iterable[Chunk], lo: int, hi: int) -> list[tuple[int, int]]:
    """The row ranges in ``[lo, hi)`` that no chunk covers."""
    gaps, row = [], lo
    for c in sorted(chunks, key=lambda c: c.start):
        if c.stop <= row or c.start >= hi:
            continue
        if c.start > row:
            gaps.append((row, c.start))
        row = max(row, c.stop)
    if row < hi:
        gaps.append((row, hi))
    return gaps


def chunk_index(chunk: Chunk) -> dict[str, Any]:
    """A chunk's ``index.json``, its names validated and its rows checked against its folder name."""
    path = chunk.path / INDEX
    index = read_json(path)
    if index.get("rows") != [chunk.start, chunk.stop]:
        raise ValueError(f"{path} says rows {index.get('rows')}, its folder {chunk.path.name}: the index was edited")
    for key, entry in index.get("arrays", {}).items():
        plain_name(entry.get("file"), f"the file of {key!r}", path)
        if "offsets" in entry:
            plain_name(entry["offsets"].get("file"), f"the offsets of {key!r}", path)
    return index


def chunk_tokens(chunk: Chunk) -> int:
    """Tokens a chunk holds (of its first per-token key; 0 without one)."""
    for entry in chunk_index(chunk)["arrays"].values():
        if "offsets" in entry:
            return int(entry["shape"][0])
    return 0


def finalize(out: Path, total: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the manifest listing the chunks that cover rows ``[0, total)`` (last), then
    remove ``run.json``. The chunks are the arrays: nothing is copied. Returns the manifest."""
    out = Path(out)
    run = read_json(out / RUN)
    chunks = [c for c in complete_chunks(out) if c.start < total]
    gaps = uncovered(chunks, 0, total)
    if gaps or not chunks:
        raise RuntimeError(f"cannot finish {out}: rows {gaps or [(0, total)]} have no complete chunk")
    listed, arrays, row = [], {}, 0
    for c in chunks:  # sorted by start; chunks never overlap
        if c.start != row or c.stop > total:
            raise RuntimeError(f"cannot finish {out}: chunk {c.path.name} overlaps rows before {row} or after {total}")
        index = chunk_index(c)
        _add_arrays(arrays, index["arrays"], c.path / INDEX)
        for entry in index["arrays"].values():
            size = regular_file(c.path / entry["file"]).st_size
            if size != entry["bytes"]:
                raise ValueError(f"{c.path / entry['file']} has {size} bytes, its index says {entry['bytes']}")
        listed.append({"dir": c.path.name, "rows": [c.start, c.stop], "arrays": index["arrays"]})
        row = c.stop
    config = run["config"]
    manifest = {
        "format": FORMAT, "version": VERSION, "model": config.get("model"), "names": list(arrays),
        "rows": total, "arrays": arrays, "chunks": listed, "config": config,
        "config_hash": config_hash(config), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(extra or {}),
    }  # fmt: skip
    check_space(out, 2 * len(json.dumps(manifest, default=str)) + 4096, MANIFEST)
    write_json(out / MANIFEST, manifest)
    (out / RUN).unlink(missing_ok=True)
    return manifest


def _add_arrays(arrays: dict[str, Any], entries: Mapping[str, Any], source: Path) -> None:
    """Accumulate each key's shape over chunks; every chunk must agree on keys, dtypes and shapes."""
    if arrays and set(arrays) != set(entries):
        raise ValueError(f"{source} holds keys {sorted(entries)}, other chunks {sorted(arrays)}")
    for key, entry in entries.items():
        spec = {"dtype": entry["dtype"], "shape": [0, *entry["shape"][1:]], "per_token": "offsets" in entry}
        have = arrays.setdefault(key, spec)
        if (have["dtype"], have["shape"][1:], have["per_token"]) != (spec["dtype"], spec["shape"][1:], spec["per_token"]):
            raise ValueError(f"{source}: {key!r} is {entry['dtype']} {entry['shape']}, other chunks {have}")
        have["shape"][0] += int(entry["shape"][0])
