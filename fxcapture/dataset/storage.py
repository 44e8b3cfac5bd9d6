"""Streaming storage of extracted features: chunks, a manifest, :func:`load`, resume.

Layout of an output directory ``out``::

    out/run.json                  the configuration of the run (written first)
    out/chunks/<start>-<stop>/    one complete chunk: rows [start, stop) of every key,
        index.json, <key>.npy     renamed into place atomically when all of it is on disk
    out/<key>.npy                 the finished arrays, rows in dataset order
    out/manifest.json             written last: a finished output is one with a manifest

A chunk is written into ``chunks/.tmp-...`` and renamed with ``os.replace``, so a killed
run leaves only complete chunks (and temporary directories that the next run removes).
Running again with the same configuration computes only the rows no chunk covers; when
all rows are there, the chunks are concatenated into one ``.npy`` per key (streamed, one
chunk in memory at a time), the manifest is written and the chunks are removed.

Example::

    >>> feats = load("features/")          # {key: np.memmap}, rows in dataset order
    >>> feats["layer4"].shape
    (50000, 2048)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from .._util.atomic import atomic_file

FORMAT = "fxcapture.features"
VERSION = 1
MANIFEST = "manifest.json"
RUN = "run.json"
CHUNKS = "chunks"
INDEX = "index.json"
_CHUNK_RE = re.compile(r"^(\d{12})-(\d{12})$")
_TMP_RE = re.compile(r"^\.tmp-(\d{12})-(\d{12})-")


class UnfinishedOutputError(RuntimeError):
    """``load`` was given an output whose run has not finished (no manifest yet)."""


# -- names and configuration --------------------------------------------------------
def file_names(keys: Iterable[str]) -> dict[str, str]:
    """A portable, unique ``.npy`` file name per key (``blocks.0.attn:attn`` -> ``blocks.0.attn_attn.npy``)."""
    names: dict[str, str] = {}
    used: set[str] = {Path(MANIFEST).stem, Path(RUN).stem}
    for key in keys:
        stem = re.sub(r"[^A-Za-z0-9._@-]", "_", key).strip(".") or "value"
        candidate, i = stem, 1
        while candidate.lower() in used:
            candidate, i = f"{stem}-{i}", i + 1
        used.add(candidate.lower())
        names[key] = candidate + ".npy"
    return names


def config_hash(config: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-able configuration."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_file`)."""
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")


def _read_json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


# -- the state of an output directory --------------------------------------------------
def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    parts = [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in keys[:4]]
    return "; ".join(parts) + ("; ..." if len(keys) > 4 else "")


def existing_config(out: Path) -> tuple[str, dict[str, Any]] | None:
    """``("finished" | "unfinished", config)`` of an fxcapture output, ``None`` if ``out`` is absent or empty.

    Raises ``FileExistsError`` for a non-empty directory (or a file) that is not one.
    """
    if not out.exists():
        return None
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another output path")
    if (out / MANIFEST).exists():
        return "finished", _read_json(out / MANIFEST)["config"]
    if (out / RUN).exists():
        return "unfinished", _read_json(out / RUN)["config"]
    if any(out.iterdir()):
        raise FileExistsError(
            f"{out} is not empty and is not an fxcapture output (no {MANIFEST} or {RUN}); "
            "choose a new or empty output directory"
        )
    return None


def prepare_output(
    out: Path, config: dict[str, Any], *, resume: bool, overwrite: bool, primary: bool = True
) -> str:
    """Check ``out`` against ``config``; return ``"finished"`` (nothing to do) or ``"run"``.

    Only the ``primary`` process (rank 0) changes the directory: it removes an old
    output when ``overwrite`` and writes ``run.json`` for a new one.
    """
    state = existing_config(out)
    if state is not None and state[0] == "unfinished" and not complete_chunks(out):
        overwrite = True  # a run that stopped before its first chunk: nothing to keep
    if state is not None and not overwrite:
        kind, old = state
        if config_hash(old) != config_hash(config):
            raise FileExistsError(
                f"{out} holds {'an' if kind == 'unfinished' else 'a finished'} "
                f"{'unfinished run' if kind == 'unfinished' else 'output'} of another configuration "
                f"({_differences(old, config)}). Pass overwrite=True (--overwrite) to replace it, "
                "or choose another output directory."
            )
        if kind == "finished":
            return "finished"
        if not resume:
            raise FileExistsError(
                f"{out} holds an unfinished run of the same configuration: resume=True continues "
                "it, overwrite=True (--overwrite) starts it again"
            )
    if primary:
        if state is not None and overwrite:
            remove_output(out)
        out.mkdir(parents=True, exist_ok=True)
        if not (out / RUN).exists():
            _write_json(out / RUN, {"format": FORMAT, "version": VERSION, "config": config,
                                    "config_hash": config_hash(config)})  # fmt: skip
        (out / CHUNKS).mkdir(exist_ok=True)
    return "run"


def remove_output(out: Path) -> None:
    """Remove what an fxcapture run wrote into ``out`` (manifest, run file, chunks, arrays)."""
    manifest = out / MANIFEST
    files = set()
    if manifest.exists():
        files = {a["file"] for a in _read_json(manifest).get("arrays", {}).values()}
        manifest.unlink()
    for path in out.iterdir():
        if path.name in files or path.suffix == ".npy" or path.name.startswith(".tmp-"):
            path.unlink()
    shutil.rmtree(out / CHUNKS, ignore_errors=True)
    (out / RUN).unlink(missing_ok=True)


# -- chunks -------------------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    start: int
    stop: int
    path: Path


def chunk_name(start: int, stop: int) -> str:
    return f"{start:012d}-{stop:012d}"


def complete_chunks(out: Path) -> list[Chunk]:
    """The complete chunks under ``out``, by start row."""
    folder = out / CHUNKS
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        m = _CHUNK_RE.match(path.name)
        if m:
            found.append(Chunk(int(m.group(1)), int(m.group(2)), path))
    return sorted(found, key=lambda c: c.start)


def remove_temporaries(out: Path, lo: int = 0, hi: int | None = None) -> None:
    """Remove temporary chunk directories of killed runs whose rows start in ``[lo, hi)``."""
    folder = out / CHUNKS
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        m = _TMP_RE.match(path.name)
        if m and lo <= int(m.group(1)) and (hi is None or int(m.group(1)) < hi):
            shutil.rmtree(path, ignore_errors=True)


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


def write_chunk(out: Path, start: int, arrays: Mapping[str, np.ndarray], files: Mapping[str, str]) -> Chunk:
    """Write rows ``[start, start + n)`` of every key as one chunk, atomically."""
    rows = {len(a) for a in arrays.values()}
    if len(rows) != 1:
        raise ValueError(f"a chunk needs the same number of rows for every key, got {sorted(rows)}")
    stop = start + rows.pop()
    final = out / CHUNKS / chunk_name(start, stop)
    tmp = out / CHUNKS / f".tmp-{chunk_name(start, stop)}-{os.getpid()}-{threading.get_ident()}"
    tmp.mkdir(parents=True)
    for key, array in arrays.items():
        np.save(tmp / files[key], array, allow_pickle=False)
    with open(tmp / INDEX, "w") as f:
        json.dump({"rows": [start, stop], "files": {k: files[k] for k in arrays}}, f)
    os.replace(tmp, final)
    return Chunk(start, stop, final)


# -- the background writer ------------------------------------------------------------
class ChunkWriter:
    """A thread that gathers batches of rows into chunks of ``chunk_rows`` and writes them.

    ``put(start, arrays, ready, release)`` hands over the rows ``[start, start + n)`` of
    every key: ``ready()`` is called before they are read (a CUDA event's
    ``synchronize``), ``release()`` after (the pinned buffer goes back to its pool).
    Rows not contiguous with the previous ones start a new chunk. The queue is bounded,
    so ``put`` blocks when the disk is slower than the model: memory stays bounded.

    Example::

        >>> w = ChunkWriter(out, chunk_rows=256, files=file_names(keys)).start()
        >>> w.put(0, {"layer4": feats})
        >>> w.close()          # writes the last, partial chunk
    """

    _STOP = object()

    def __init__(self, out: Path, chunk_rows: int, files: Mapping[str, str], max_pending: int = 4) -> None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.out, self.chunk_rows, self.files = Path(out), chunk_rows, dict(files)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_pending))
        self._thread = threading.Thread(target=self._run, name="fxcapture-writer", daemon=True)
        self._error: BaseException | None = None
        self._aborted = False  # set by abort(): no partial chunk at the end
        self._buffers: dict[str, np.ndarray] = {}
        self._start = 0  # first row of the chunk being filled
        self._filled = 0
        self.chunks_written = 0

    def start(self) -> "ChunkWriter":
        self._thread.start()
        return self

    # -- main thread ---------------------------------------------------------------
    def put(
        self,
        start: int,
        arrays: Mapping[str, Any],
        ready: Callable[[], Any] | None = None,
        release: Callable[[], Any] | None = None,
    ) -> None:
        """Queue rows ``[start, start + n)``; raises what the writer thread raised."""
        item = (start, arrays, ready, release)
        while True:
            self._raise_error()
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Write what is queued and the last partial chunk, then stop the thread."""
        if self._thread.is_alive():
            self._queue.put(self._STOP)
            self._thread.join()
        self._raise_error()

    def abort(self) -> None:
        """Write the complete chunks of what is queued, drop the last partial chunk, stop."""
        self._aborted = True
        if self._thread.is_alive():
            self._queue.put(self._STOP)
            self._thread.join()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing features to {self.out} failed: {self._error}") from self._error

    # -- writer thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is self._STOP:
                    break
                self._add(*item)
            if not self._aborted:
                self._flush()
        except BaseException as err:  # handed to the main thread by put()/close()
            self._error = err
            self._drain()

    def _drain(self) -> None:
        """After an error: release every queued buffer so that the main thread never waits."""
        while True:
            item = self._queue.get()
            if item is self._STOP:
                return
            if item[3] is not None:
                item[3]()

    def _add(self, start: int, arrays: Mapping[str, Any], ready, release) -> None:
        try:
            if ready is not None:
                ready()
            arrays = {k: _as_numpy(v) for k, v in arrays.items()}
            n = len(next(iter(arrays.values())))
            if self._filled and start != self._start + self._filled:
                self._flush()  # a new range of rows
            if not self._filled:
                self._start = start
            done = 0
            while done < n:
                take = min(n - done, self.chunk_rows - self._filled)
                for key, array in arrays.items():
                    buf = self._buffer(key, array)
                    buf[self._filled : self._filled + take] = array[done : done + take]
                self._filled += take
                done += take
                if self._filled == self.chunk_rows:
                    self._flush()  # the next chunk starts where this one stops
        finally:
            if release is not None:
                release()

    def _buffer(self, key: str, array: np.ndarray) -> np.ndarray:
        buf = self._buffers.get(key)
        if buf is None or buf.shape[1:] != array.shape[1:] or buf.dtype != array.dtype:
            buf = self._buffers[key] = np.empty((self.chunk_rows, *array.shape[1:]), array.dtype)
        return buf

    def _flush(self) -> None:
        if not self._filled:
            return
        arrays = {k: b[: self._filled] for k, b in self._buffers.items()}
        write_chunk(self.out, self._start, arrays, self.files)
        self.chunks_written += 1
        self._start += self._filled
        self._filled = 0


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    return value.numpy()  # a CPU torch tensor: no copy


# -- finishing and reading ------------------------------------------------------------
def _write_npy(path: Path, dtype: np.dtype, shape: tuple[int, ...], parts: Iterable[np.ndarray]) -> None:
    """Stream ``parts`` (rows in order) into one ``.npy`` file without holding them all."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with open(tmp, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_2_0(f, header)
        for part in parts:
            f.write(np.ascontiguousarray(part, dtype=dtype).data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _chunk_index(chunk: Chunk) -> dict[str, str]:
    return _read_json(chunk.path / INDEX)["files"]


def finalize(out: Path, total: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Concatenate the chunks covering ``[0, total)`` into one ``.npy`` per key, then write
    the manifest (last) and remove the chunks. Returns the manifest."""
    out = Path(out)
    run = _read_json(out / RUN)
    chunks = complete_chunks(out)
    gaps = uncovered(chunks, 0, total)
    if gaps or not chunks:
        raise RuntimeError(f"cannot finish {out}: rows {gaps or [(0, total)]} have no complete chunk")
    ordered, row = [], 0
    for c in chunks:  # sorted by start; chunks never overlap
        if c.start != row:
            raise RuntimeError(f"cannot finish {out}: chunk {c.path.name} overlaps rows before {row}")
        ordered.append(c)
        row = c.stop
        if row >= total:
            break
    files = _chunk_index(ordered[0])
    arrays = {}
    for key, name in files.items():
        first = np.load(ordered[0].path / name, mmap_mode="r")
        shape = (total, *first.shape[1:])
        parts = (np.load(c.path / _chunk_index(c)[key]) for c in ordered)
        _write_npy(out / name, first.dtype, shape, parts)
        arrays[key] = {"file": name, "shape": list(shape), "dtype": first.dtype.str}
    config = run["config"]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "model": config.get("model"),
        "names": list(files),
        "rows": total,
        "arrays": arrays,
        "config": config,
        "config_hash": config_hash(config),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }
    _write_json(out / MANIFEST, manifest)
    shutil.rmtree(out / CHUNKS, ignore_errors=True)
    (out / RUN).unlink(missing_ok=True)
    return manifest


def read_manifest(out: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a finished output; a clear error for an unfinished or missing one."""
    out = Path(out)
    if (out / MANIFEST).exists():
        manifest = _read_json(out / MANIFEST)
        if manifest.get("format") != FORMAT or manifest.get("version", 0) > VERSION:
            raise ValueError(
                f"{out / MANIFEST} is format {manifest.get('format')!r} version "
                f"{manifest.get('version')}; this fxcapture reads {FORMAT!r} up to version {VERSION}"
            )
        return manifest
    if (out / RUN).exists():
        run = _read_json(out / RUN)
        done = sum(c.stop - c.start for c in complete_chunks(out))
        total = run["config"].get("rows")
        of = f" of {total}" if total is not None else ""
        raise UnfinishedOutputError(
            f"{out} is an unfinished extraction ({done}{of} rows in complete chunks, no {MANIFEST}): "
            "run the same extract again to resume it"
        )
    raise FileNotFoundError(f"{out} is not an fxcapture output: {out / MANIFEST} does not exist")


def load(out: str | os.PathLike, *, mmap: bool = True) -> dict[str, np.ndarray]:
    """The arrays of a finished :func:`fxcapture.extract` output, keyed by name.

    Rows are in dataset order (also for a run sharded over several processes). With
    ``mmap`` (default) the arrays are memory-mapped read-only: nothing is read until
    it is used. Each array is a plain ``.npy`` file, so ``np.load(path, mmap_mode="r")``
    works too; ``manifest.json`` lists the files, shapes, dtypes and the configuration.

    Example::

        >>> feats = fxcapture.load("features/")
        >>> feats["layer4"][:10].mean()
    """
    out = Path(out)
    manifest = read_manifest(out)
    return {
        key: np.load(out / manifest["arrays"][key]["file"], mmap_mode="r" if mmap else None)
        for key in manifest["names"]
    }


__all__ = ["load", "read_manifest", "ChunkWriter", "UnfinishedOutputError", "finalize", "prepare_output"]
