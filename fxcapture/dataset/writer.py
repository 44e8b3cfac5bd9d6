"""Chunks: rows ``[start, stop)`` of every key, written whole or not at all.

A chunk is a folder ``chunks/<start>-<stop>/`` (12-digit sample rows) holding one
``.npy`` per key, ``<stem>.offsets.npy`` beside a per-token key, and ``index.json``
(each file's shape, dtype, size in bytes and CRC-32). It is written under a private
temporary name, fsynced, and renamed into place: a killed run leaves only complete
chunks. :class:`ChunkWriter` gathers batches into chunks on a background thread.

Example::

    >>> w = ChunkWriter(out, chunk_rows=256, files=file_names(keys)).start()
    >>> w.put(0, {"layer4": feats})
    >>> w.close()          # writes the last, partial chunk
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from .files import WriteError, check_space, crc32, create_file, make_private_dir, write_error, write_json
from .ragged import Ragged

CHUNKS = "chunks"
INDEX = "index.json"
OFFSETS = ".offsets.npy"
RESERVED = ("manifest", "run", "index")
CHUNK_RE = re.compile(r"^(\d{12})-(\d{12})$")
_MAX_STEM = 120


def file_names(keys: Iterable[str]) -> dict[str, str]:
    """A portable, unique ``.npy`` file name per key (``blocks.0.attn:attn`` -> ``blocks.0.attn_attn.npy``);
    long keys are cut and end in a hash, so that every name fits any file system."""
    names: dict[str, str] = {}
    used: set[str] = set(RESERVED)
    for key in keys:
        stem = re.sub(r"[^A-Za-z0-9._@-]", "_", key).strip(".") or "value"
        if len(stem) > _MAX_STEM:
            stem = stem[:_MAX_STEM] + "-" + hashlib.sha256(key.encode()).hexdigest()[:10]
        candidate, i = stem, 1
        while candidate.lower() in used or candidate.lower() + ".offsets" in used:
            candidate, i = f"{stem}-{i}", i + 1
        used.update((candidate.lower(), candidate.lower() + ".offsets"))
        names[key] = candidate + ".npy"
    return names


def chunk_name(start: int, stop: int) -> str:
    return f"{start:012d}-{stop:012d}"


def host_array(value: Any) -> tuple[np.ndarray, str]:
    """``(numpy array, dtype name)``; a torch ``bfloat16`` tensor becomes its raw ``uint16``."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:
            return value.view(torch.int16).numpy().view(np.uint16), "bfloat16"
        value = value.numpy()  # a CPU tensor: no copy
    return value, value.dtype.str


def npy_header(dtype: np.dtype, shape: tuple) -> bytes:
    """The header of a version 2.0 ``.npy`` file of ``dtype`` and ``shape``."""
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_2_0(buf, header)
    return buf.getvalue()


def _write_npy(path: Path, parts: list[np.ndarray], rows: int) -> dict[str, Any]:
    """One ``.npy`` of ``parts`` stacked (streamed, no concatenation); returns its bytes and CRC."""
    first = parts[0]
    shape = (rows, *first.shape[1:])
    header = npy_header(first.dtype, shape)
    f = create_file(path)
    try:
        with f:
            f.write(header)
            crc = crc32(header)
            for part in parts:
                data = np.ascontiguousarray(part).reshape(-1).view(np.uint8)
                f.write(data)
                crc = crc32(data, crc)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise write_error(path, err, len(header) + sum(p.nbytes for p in parts)) from err
    return {"bytes": len(header) + sum(p.nbytes for p in parts), "crc32": crc}


@dataclass
class _Column:
    """The rows of one key gathered for the chunk being filled."""

    dtype: str
    parts: list
    lengths: list | None = None  # per-token keys: rows per sample

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


def write_chunk(out: Path, start: int, columns: Mapping[str, _Column], rows: int, files: Mapping[str, str]) -> Path:
    """Write rows ``[start, start + rows)`` of every key as one chunk folder, atomically."""
    folder = Path(out) / CHUNKS
    final = folder / chunk_name(start, start + rows)
    needed = sum(c.nbytes for c in columns.values()) + 4096 * (2 * len(columns) + 1)
    check_space(folder, needed, f"chunk {final.name}")
    tmp = make_private_dir(folder, chunk_name(start, start + rows))
    try:
        _fill_chunk(tmp, start, columns, rows, files)
        os.replace(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)  # what was complete stays; this chunk never was
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise write_error(final, err) from err
        raise
    return final


def _fill_chunk(tmp: Path, start: int, columns: Mapping[str, _Column], rows: int, files: Mapping[str, str]) -> None:
    index: dict[str, Any] = {"rows": [start, start + rows], "arrays": {}}
    for key, col in columns.items():
        name = files[key]
        tokens = sum(len(p) for p in col.parts)
        entry = {"file": name, "dtype": col.dtype, "shape": [tokens, *col.parts[0].shape[1:]]}
        entry.update(_write_npy(tmp / name, col.parts, tokens))
        if col.lengths is not None:
            lengths = np.concatenate(col.lengths).astype(np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            off_name = name[: -len(".npy")] + OFFSETS
            entry["offsets"] = {"file": off_name, **_write_npy(tmp / off_name, [offsets], len(offsets))}
        index["arrays"][key] = entry
    write_json(tmp / INDEX, index)


class ChunkWriter:
    """A thread that gathers batches of rows into chunks of ``chunk_rows`` and writes them.

    ``put(start, arrays, ready, release)`` hands over rows ``[start, start + n)`` of every
    key (arrays, CPU tensors or :class:`Ragged` per-token values): ``ready()`` is called
    before they are read (a CUDA event), ``release()`` after (the pinned buffer goes back).
    Rows not contiguous with the previous ones start a new chunk; a chunk is also written
    when it reaches ``chunk_bytes`` or when its first row waited ``flush_seconds``. The
    queue is bounded, so memory stays bounded. A failed write ends the thread and is
    raised, naming the file and the cause, by the next ``put`` or ``close``; nothing waits
    forever on a dead writer.
    """

    _STOP = object()

    def __init__(self, out: Path, chunk_rows: int, files: Mapping[str, str], max_pending: int = 4,
                 chunk_bytes: int | None = None, flush_seconds: float = 30.0) -> None:  # fmt: skip
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.out, self.chunk_rows, self.files = Path(out), chunk_rows, dict(files)
        self.chunk_bytes, self.flush_seconds = chunk_bytes, flush_seconds
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_pending))
        self._thread = threading.Thread(target=self._run, name="fxcapture-writer", daemon=True)
        self._error: BaseException | None = None
        self._columns: dict[str, _Column] = {}
        self._start = 0  # first row of the chunk being filled
        self._filled = 0
        self._since = 0.0  # when the oldest buffered row arrived
        self.chunks_written = 0
        self.rows_written = 0
        self.tokens_written = 0

    def start(self) -> "ChunkWriter":
        self._thread.start()
        return self

    # -- main thread ---------------------------------------------------------------
    def put(self, start: int, arrays: Mapping[str, Any], ready: Callable | None = None,
            release: Callable | None = None) -> None:  # fmt: skip
        """Queue rows ``[start, start + n)``; raises what the writer thread raised."""
        item = (start, arrays, ready, release)
        while True:
            self._raise_error()
            if not self._thread.is_alive():
                raise RuntimeError("the fxcapture writer thread is not running (closed, or never started)")
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Write what is queued and the last partial chunk, then stop the thread."""
        self._stop()
        self._raise_error()

    def abort(self) -> None:
        """After an error or Ctrl-C in the loop: write what is queued (whole rows), stop,
        and raise nothing (the caller is already raising)."""
        self._stop()

    def _stop(self) -> None:
        while self._thread.is_alive():
            try:
                self._queue.put(self._STOP, timeout=0.2)
                break
            except queue.Full:
                continue
        self._thread.join()

    def _raise_error(self) -> None:
        err = self._error
        if err is None:
            return
        if isinstance(err, OSError):
            err = write_error(Path(err.filename or self.out), err)
            raise WriteError(err.errno, str(err)) from err
        raise RuntimeError(f"writing features to {self.out} failed: {err}") from err

    # -- writer thread ---------------------------------------------------------------
    def _run(self) -> None:
        stopped = False
        try:
            while True:
                try:
                    item = self._queue.get(timeout=min(1.0, self.flush_seconds / 4))
                except queue.Empty:
                    self._flush_if_old()
                    continue
                if item is self._STOP:
                    stopped = True
                    break
                self._add(*item)
                self._flush_if_old()
            self._flush()
        except BaseException as err:  # handed to the main thread by put()/close()
            self._error = err
            if not stopped:
                self._drain()

    def _drain(self) -> None:
        """After an error: release every queued buffer until told to stop, so that the
        main thread never waits on a buffer the dead writer holds."""
        while True:
            item = self._queue.get()
            if item is self._STOP:
                return
            if item[3] is not None:
                item[3]()

    def _flush_if_old(self) -> None:
        if self._filled and time.monotonic() - self._since >= self.flush_seconds:
            self._flush()

    def _add(self, start: int, arrays: Mapping[str, Any], ready, release) -> None:
        try:
            if ready is not None:
                ready()
            values = {k: _host(v, copy=release is not None) for k, v in arrays.items()}
            n = next(iter(values.values()))[3]
            if self._filled and start != self._start + self._filled:
                self._flush()  # a new range of rows
            if not self._filled:
                self._start, self._since = start, time.monotonic()
            done = 0
            while done < n:
                take = min(n - done, self.chunk_rows - self._filled)
                for key, (array, dtype, offsets, _) in values.items():
                    self._take(key, array, dtype, offsets, done, done + take)
                self._filled += take
                done += take
                full = self.chunk_bytes is not None and self._nbytes() >= self.chunk_bytes
                if self._filled == self.chunk_rows or full:
                    self._flush()  # the next chunk starts where this one stops
                    self._start, self._since = start + done, time.monotonic()
        finally:
            if release is not None:
                release()

    def _take(self, key: str, array: np.ndarray, dtype: str, offsets: np.ndarray | None, a: int, b: int) -> None:
        col = self._columns.get(key)
        if col is None:
            col = self._columns[key] = _Column(dtype, [], [] if offsets is not None else None)
        if offsets is None:
            col.parts.append(array[a:b])
        else:
            col.parts.append(array[offsets[a] : offsets[b]])
            col.lengths.append(np.diff(offsets[a : b + 1]))

    def _nbytes(self) -> int:
        return sum(c.nbytes for c in self._columns.values())

    def _flush(self) -> None:
        if not self._filled:
            return
        write_chunk(self.out, self._start, self._columns, self._filled, self.files)
        self.chunks_written += 1
        self.rows_written += self._filled
        self.tokens_written += max((sum(len(p) for p in c.parts) for c in self._columns.values()
                                    if c.lengths is not None), default=0)  # fmt: skip
        self._start += self._filled
        self._filled = 0
        self._columns = {}


def _host(value: Any, copy: bool) -> tuple[np.ndarray, str, np.ndarray | None, int]:
    """``(array, dtype name, offsets or None, rows)``; copied when the buffer goes back to a pool."""
    if isinstance(value, Ragged):
        array, dtype = host_array(value.values)
        lengths = np.asarray(value.lengths.numpy() if isinstance(value.lengths, torch.Tensor) else value.lengths)
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        return (array.copy() if copy else array), dtype, offsets, len(lengths)
    array, dtype = host_array(value)
    return (array.copy() if copy else array), dtype, None, len(array)


__all__ = ["ChunkWriter", "write_chunk", "file_names", "chunk_name", "host_array", "WriteError"]
