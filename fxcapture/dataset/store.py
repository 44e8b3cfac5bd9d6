"""Reading an output back: :func:`load` maps the chunks lazily as one array per key.

``load(out)[key]`` is a :class:`Column`: ``shape``, ``dtype``, ``len``, numpy indexing
over rows (ints, slices, index arrays, masks, ``[:]``), ``np.asarray``; each chunk is
memory-mapped the first time a row of it is read (a bounded number stay open), after
checking its size, its header against the manifest and its CRC-32. A chunk is found by
bisection over the chunks' first rows. Per-token keys are a :class:`TokenColumn`: the
same over tokens, plus ``.sample(i)`` -> ``(len_i, dim)`` and ``.offsets``. ``bfloat16``
is stored as raw ``uint16``: reads give ``float32``, ``.raw`` the stored bits.

Example::

    >>> feats = fxcapture.load("feats/")
    >>> feats["layer4"][:10].mean(), feats["layer4"].shape
    >>> for batch in feats.loader("layer4", batch_size=4096, shuffle=True): ...
"""

from __future__ import annotations

import bisect
import collections
import operator
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from .files import crc32, plain_name, read_json, real_dir, regular_file
from .loader import Loader
from .output import FORMAT, MANIFEST, RUN, VERSION, Chunk, UnfinishedOutputError, complete_chunks
from .writer import CHUNK_RE, CHUNKS

_OPEN_MAPS = 64  # chunk maps kept open per key (each holds a file descriptor)
_BLOCK_BYTES = 32 * 2**20  # the loader reads at most this much per sequential read


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


class _Part:
    """One file of a key: rows ``[start, start + rows)``, mapped on first use and checked."""

    def __init__(self, path: Path, start: int, rows: int, entry: Mapping[str, Any], stored: np.dtype) -> None:
        self.path, self.start, self.rows, self.entry, self.stored = path, start, rows, entry, stored

    def open(self, verify: bool, mmap: bool) -> np.ndarray:
        size = regular_file(self.path).st_size
        if "bytes" in self.entry and size != self.entry["bytes"]:
            raise ValueError(
                f"{self.path} has {size} bytes, the manifest says {self.entry['bytes']}: the file is corrupt"
            )
        try:
            array = np.load(self.path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise ValueError(f"{self.path} is not a readable .npy file ({err})") from None
        want = (self.rows, *self.entry["shape"][1:])
        if array.shape != tuple(want) or array.dtype != self.stored:
            raise ValueError(
                f"{self.path} holds {array.dtype} {array.shape}, the manifest says {self.stored} {tuple(want)}: "
                "the file or the manifest was edited"
            )
        if verify and "crc32" in self.entry:
            with open(self.path, "rb") as f:
                crc = 0
                while block := f.read(1 << 22):
                    crc = crc32(block, crc)
            if crc != self.entry["crc32"]:
                raise ValueError(
                    f"{self.path} fails its checksum (CRC-32 {crc:#x}, written {self.entry['crc32']:#x}): "
                    "the file is corrupt"
                )
        return array


def _is_bool_scalar(index: Any) -> bool:
    return isinstance(index, (bool, np.bool_)) or (isinstance(index, np.ndarray) and index.ndim == 0
                                                   and index.dtype == bool)  # fmt: skip


class Column:
    """One key of an output: its chunks as one read-only array-like over rows."""

    def __init__(self, key: str, parts: list[_Part], shape: tuple, dtype: str, *, verify: bool = True,
                 mmap: bool = True, raw: bool = False) -> None:  # fmt: skip
        self.key, self.parts, self.stored_dtype = key, parts, dtype
        self.shape = tuple(shape)
        self._starts = [p.start for p in parts]
        self._verify, self._mmap, self._raw = verify, mmap, raw
        self._maps: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._checked: set[int] = set()

    # -- numpy-like ---------------------------------------------------------------------
    @property
    def dtype(self) -> np.dtype:
        if self.stored_dtype == "bfloat16":
            return np.dtype(np.uint16 if self._raw else np.float32)
        return np.dtype(self.stored_dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def raw(self) -> "Column":
        """The stored values as they are on disk (``bfloat16`` as its ``uint16`` bits)."""
        col = type(self).__new__(type(self))
        col.__dict__.update(self.__dict__, _raw=True)
        return col

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}({self.key!r}, shape={self.shape}, dtype={self.stored_dtype}, chunks={len(self.parts)})"

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        """``np.array(col)`` / ``np.asarray(col)``: every row, as a new writable array
        (the chunks are read-only maps of files; numpy users expect an array they own)."""
        if copy is False:
            raise ValueError(
                f"{self.key!r} lives in its chunk files: an array of it is always a copy "
                "(use np.asarray(col) or np.array(col); col[a:b] reads rows without one)"
            )
        values = self[:]
        if type(values) is np.ndarray and values.flags.owndata and values.flags.writeable:
            return values if dtype is None else values.astype(dtype, copy=False)  # read already
        return np.array(values, dtype=dtype, copy=True)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    def sample(self, i: int) -> np.ndarray:
        """Only per-token keys have samples of several rows (:meth:`TokenColumn.sample`)."""
        raise TypeError(
            f"{self.key!r} holds one row per sample (a reduced key): sample {i} is col[{i}]; "
            ".sample(i) gives the tokens of a per-token key (reduce='tokens')"
        )

    def __getitem__(self, index: Any) -> np.ndarray:
        """Rows as numpy indexes them: an integer (a row), a slice, an integer array, a
        boolean mask, ``None`` or a boolean scalar (a new first axis); floats raise."""
        if isinstance(index, tuple):
            first, rest = (index[0] if index else slice(None)), index[1:]
            if first is Ellipsis or first is None or _is_bool_scalar(first):
                return self[:][index]
            got = self[first]
            scalar = not isinstance(first, slice) and np.ndim(first) == 0
            return got[rest] if scalar else got[(slice(None), *rest)]
        if index is Ellipsis:
            return self[:]
        if index is None or _is_bool_scalar(index):  # numpy: a new axis (of 1 or 0 rows)
            return self[:][index]
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            return self._convert(self._range(start, max(start, stop)))
        if np.ndim(index) == 0:
            try:
                i = operator.index(index)
            except TypeError:
                raise IndexError(
                    f"rows of {self.key!r} are indexed by integers, slices, integer arrays or boolean "
                    f"masks (as in numpy), not by {type(index).__name__} {index!r}"
                ) from None
            if not -len(self) <= i < len(self):
                raise IndexError(f"row {i} out of range for {self.key!r} with {len(self)} rows")
            i %= len(self)
            k = bisect.bisect_right(self._starts, i) - 1
            return self._convert(self._map(k)[i - self.parts[k].start])
        return self._convert(self._take(np.asarray(index)))

    # -- reading --------------------------------------------------------------------------
    def _convert(self, values: np.ndarray) -> np.ndarray:
        if self.stored_dtype == "bfloat16" and not self._raw:
            return _bf16_to_f32(np.asarray(values))
        return values  # a view of one chunk's map stays a view: nothing is read yet

    def _map(self, k: int) -> np.ndarray:
        array = self._maps.get(k)
        if array is None:
            array = self.parts[k].open(self._verify and k not in self._checked, self._mmap)
            self._checked.add(k)
            self._maps[k] = array
            if len(self._maps) > _OPEN_MAPS:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(k)
        return array

    def _range(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)``: one slice of each chunk they touch."""
        if start >= stop:
            return np.empty((0, *self.shape[1:]), self.parts[0].stored if self.parts else np.float32)
        first = bisect.bisect_right(self._starts, start) - 1
        pieces = []
        for k in range(first, len(self.parts)):
            p = self.parts[k]
            if p.start >= stop:
                break
            pieces.append(self._map(k)[max(start, p.start) - p.start : min(stop, p.start + p.rows) - p.start])
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _take(self, index: np.ndarray) -> np.ndarray:
        if index.dtype == bool:
            if index.shape != (len(self),):
                raise IndexError(f"a boolean index over {self.key!r} needs shape ({len(self)},), got {index.shape}")
            index = np.flatnonzero(index)
        if index.dtype.kind not in "iu":
            raise IndexError(
                f"rows of {self.key!r} are indexed by integers, slices or a boolean mask, got {index.dtype}"
            )
        flat = index.reshape(-1).astype(np.int64)
        if flat.size and (flat.min() < -len(self) or flat.max() >= len(self)):
            raise IndexError(f"an index is out of range for {self.key!r} with {len(self)} rows")
        flat %= max(1, len(self))
        which = np.searchsorted(self._starts, flat, side="right") - 1
        out = np.empty((flat.size, *self.shape[1:]), self.parts[0].stored if self.parts else np.float32)
        for k in np.unique(which):
            sel = which == k
            out[sel] = self._map(int(k))[flat[sel] - self.parts[k].start]
        return out.reshape(*index.shape, *self.shape[1:])

    def blocks(self, max_bytes: int = _BLOCK_BYTES) -> list[tuple[int, int]]:
        """Row ranges, each within one chunk and at most ``max_bytes``: sequential reads."""
        if not self.parts:
            return []
        row_bytes = max(1, int(np.prod(self.shape[1:], dtype=np.int64)) * self.parts[0].stored.itemsize)
        step = max(1, max_bytes // row_bytes)
        return [(a, min(a + step, p.start + p.rows)) for p in self.parts
                for a in range(p.start, p.start + p.rows, step)]  # fmt: skip

    def verify(self) -> None:
        """Open and check every chunk (sizes, headers, checksums); raises naming the bad file."""
        for k, part in enumerate(self.parts):
            part.open(True, True)
            self._checked.add(k)


class TokenColumn(Column):
    """A per-token key: a ``(total_tokens, ...)`` array-like, and per-sample access.

    ``col[a:b]`` are tokens; ``col.sample(i)`` the ``(len_i, ...)`` tokens of sample ``i``;
    ``col.offsets`` the ``(samples + 1,)`` start of each sample in the flat rows.
    """

    def __init__(self, key: str, parts: list[_Part], offsets: list[_Part], shape: tuple, dtype: str,
                 **kw: Any) -> None:  # fmt: skip
        super().__init__(key, parts, shape, dtype, **kw)
        self._offset_parts, self._offsets = offsets, None

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            pieces, base = [np.zeros(1, np.int64)], 0
            for part, tokens in zip(self._offset_parts, self.parts):
                local = np.asarray(part.open(self._verify, False))
                pieces.append(local[1:] + base)
                base += tokens.rows
            self._offsets = np.concatenate(pieces)
        return self._offsets

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def samples(self) -> int:
        return len(self.offsets) - 1

    def sample(self, i: int) -> np.ndarray:
        """The tokens of sample ``i``: ``(len_i, ...)``."""
        off = self.offsets
        if not -self.samples <= i < self.samples:
            raise IndexError(f"sample {i} out of range for {self.key!r} with {self.samples} samples")
        i %= self.samples
        return self[int(off[i]) : int(off[i + 1])]


class Features(Mapping[str, Column]):
    """A finished output: ``{key: Column}`` plus the manifest and a shuffled :meth:`loader`."""

    def __init__(self, out: Path, manifest: dict[str, Any], columns: dict[str, Column]) -> None:
        self.out, self.manifest, self._columns = out, manifest, columns

    def __getitem__(self, key: str) -> Column:
        try:
            return self._columns[key]
        except KeyError:
            raise KeyError(f"{key!r} is not stored in {self.out}; it holds {list(self._columns)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._columns)

    def __len__(self) -> int:
        return len(self._columns)

    def __repr__(self) -> str:
        return f"Features({str(self.out)!r}, {{{', '.join(f'{k!r}: {c.shape}' for k, c in self.items())}}})"

    def loader(self, key: str, batch_size: int, shuffle: bool = True, *, seed: int | None = None,
               buffer_blocks: int = 8, drop_last: bool = False, dtype: torch.dtype | None = None) -> "Loader":  # fmt: skip
        """Batches of rows (tokens, for a per-token key) of ``key`` as torch tensors, read at disk
        speed: blocks in shuffled order, sequential reads, rows shuffled within ``buffer_blocks``."""
        return Loader(self[key], batch_size, shuffle, seed, buffer_blocks, drop_last, dtype)

    def verify(self) -> None:
        """Check every chunk of every key (sizes, headers, CRC-32)."""
        for col in self.values():
            col.verify()


# -- manifests ---------------------------------------------------------------------------
def read_manifest(out: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a finished output; a clear error for an unfinished or missing one."""
    out = Path(out)
    if (out / MANIFEST).exists():
        manifest = read_json(out / MANIFEST)
        if manifest.get("format") != FORMAT or not 1 <= int(manifest.get("version", 0)) <= VERSION:
            raise ValueError(
                f"{out / MANIFEST} is format {manifest.get('format')!r} version "
                f"{manifest.get('version')}; this fxcapture reads {FORMAT!r} up to version {VERSION}"
            )
        return manifest
    if (out / RUN).exists():
        run = read_json(out / RUN)
        done = sum(c.stop - c.start for c in complete_chunks(out))
        total = run.get("config", {}).get("rows")
        of = f" of {total}" if total is not None else ""
        raise UnfinishedOutputError(
            f"{out} is an unfinished extraction ({done}{of} rows in complete chunks, no {MANIFEST}): "
            "run the same extract again to resume it"
        )
    raise FileNotFoundError(f"{out} is not an fxcapture output: {out / MANIFEST} does not exist")


def _stored(dtype: str) -> np.dtype:
    return np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)


def _columns_v1(out: Path, manifest: dict[str, Any], **kw: Any) -> dict[str, Column]:
    cols = {}
    for key in manifest["names"]:
        entry = manifest["arrays"][key]
        name = plain_name(entry.get("file"), f"the file of {key!r}", out / MANIFEST)
        part = _Part(out / name, 0, int(entry["shape"][0]), entry, _stored(entry["dtype"]))
        cols[key] = Column(key, [part], tuple(entry["shape"]), np.dtype(entry["dtype"]).str, **kw)
    return cols


def _columns_v2(out: Path, manifest: dict[str, Any], **kw: Any) -> dict[str, Column]:
    parts: dict[str, list[_Part]] = {k: [] for k in manifest["arrays"]}
    offsets: dict[str, list[_Part]] = {k: [] for k in manifest["arrays"]}
    starts = {k: 0 for k in manifest["arrays"]}
    row = 0
    if not real_dir(out / CHUNKS):
        how = "a link" if (out / CHUNKS).is_symlink() else "not a folder"
        raise ValueError(
            f"{out / CHUNKS} is {how}: fxcapture reads an output only inside {out} (never through a "
            "link); move the chunks folder itself there"
        )
    for chunk in manifest["chunks"]:
        name = str(chunk.get("dir"))
        if not CHUNK_RE.match(name) or not real_dir(out / CHUNKS / name):
            raise ValueError(f"{out / MANIFEST} lists chunk {name!r}, which is not a chunk folder inside {out}")
        if chunk["rows"][0] != row:
            raise ValueError(f"{out / MANIFEST}: chunk {name} starts at row {chunk['rows'][0]}, expected {row}")
        row = chunk["rows"][1]
        for key, spec in manifest["arrays"].items():
            entry = chunk["arrays"][key]
            file = plain_name(entry.get("file"), f"the file of {key!r}", out / MANIFEST)
            n = int(entry["shape"][0])
            parts[key].append(_Part(out / CHUNKS / name / file, starts[key], n, entry, _stored(spec["dtype"])))
            starts[key] += n
            if spec.get("per_token"):
                off = entry["offsets"]
                plain_name(off.get("file"), f"the offsets of {key!r}", out / MANIFEST)
                rows = chunk["rows"][1] - chunk["rows"][0] + 1
                path = out / CHUNKS / name / off["file"]
                offsets[key].append(_Part(path, 0, rows, {**off, "shape": [rows]}, np.dtype(np.int64)))
    if row != manifest["rows"]:
        raise ValueError(f"{out / MANIFEST}: its chunks hold {row} rows, it says {manifest['rows']}")
    cols: dict[str, Column] = {}
    for key, spec in manifest["arrays"].items():
        if starts[key] != spec["shape"][0]:
            raise ValueError(f"{out / MANIFEST}: {key!r} chunks hold {starts[key]} rows, it says {spec['shape'][0]}")
        if spec.get("per_token"):
            cols[key] = TokenColumn(key, parts[key], offsets[key], tuple(spec["shape"]), spec["dtype"], **kw)
        else:
            cols[key] = Column(key, parts[key], tuple(spec["shape"]), spec["dtype"], **kw)
    return cols


def load(out: str | os.PathLike, *, mmap: bool = True, verify: bool = True) -> Features:
    """The arrays of a finished :func:`fxcapture.extract` output, keyed by name.

    Rows are in dataset order (also for a run sharded over several processes). Each key is
    a lazy :class:`Column` over the chunk files: nothing is read until it is used; with
    ``verify`` each chunk's CRC-32 is checked when it is first read. ``mmap=False`` reads
    chunks into memory instead of mapping them.

    Example::

        >>> feats = fxcapture.load("features/")
        >>> feats["layer4"][:10].mean()
    """
    out = Path(out)
    manifest = read_manifest(out)
    build = _columns_v1 if int(manifest.get("version", 1)) == 1 else _columns_v2
    try:
        columns = build(out, manifest, verify=verify, mmap=mmap)
    except (KeyError, TypeError, IndexError, AttributeError) as err:
        raise ValueError(
            f"{out / MANIFEST} is malformed ({type(err).__name__}: {err}): the file was edited or is corrupt"
        ) from None
    return Features(out, manifest, columns)


__all__ = ["load", "read_manifest", "Features", "Column", "TokenColumn", "UnfinishedOutputError", "Chunk"]
