"""Streaming storage of extracted features: the chunks are the store.

Layout of an output folder ``out`` (format version 2)::

    out/.fxcapture.lock           an OS lock (flock) held by the run writing the folder
    out/run.json                  the run's identity (written first, removed when finished)
    out/chunks/<start>-<stop>/    rows [start, stop) of every key (12-digit sample rows):
        <key>.npy                 (rows, ...) plain .npy, or (tokens, ...) for a per-token key
        <key>.offsets.npy         per-token keys: int64 (rows + 1,), sample i is
                                  tokens [offsets[i], offsets[i + 1]) of <key>.npy
        index.json                {"rows": [start, stop], "arrays": {key: {"file", "dtype",
                                  "shape", "bytes", "crc32", "offsets": {...}}}}
    out/manifest.json             written last: a finished output is one with a manifest

``manifest.json`` holds ``"arrays"`` (per key: ``dtype``, total ``shape``, ``per_token``)
and ``"chunks"``: the chunk folders in row order, each with its ``index.json`` entries.
A chunk is written under a private temporary name (``.fxcapture-tmp-...``) and renamed
into place, so a killed run leaves only complete chunks; the next run removes the
temporaries and computes only the rows no chunk covers. Finishing writes the manifest
only: nothing is copied. ``bfloat16`` is stored as its raw ``uint16`` bits (``dtype``
says ``"bfloat16"``; ``(bits.astype(uint32) << 16).view(float32)`` converts). With
numpy alone::

    m = json.load(open("out/manifest.json"))
    layer4 = np.concatenate([np.load(f"out/chunks/{c['dir']}/{c['arrays']['layer4']['file']}",
                                     mmap_mode="r") for c in m["chunks"]])

Format version 1 outputs (one ``out/<key>.npy`` per key) still load.
:func:`load` maps the chunks lazily as one array per key (:mod:`.store`); the chunk
writer is :mod:`.writer`, the folder's state :mod:`.output`, the lock :mod:`.lock`,
safe file creation :mod:`.files`.
"""

from __future__ import annotations

from .files import WriteError
from .lock import OutputLock, OutputLockedError
from .output import (
    FORMAT,
    MANIFEST,
    RUN,
    VERSION,
    Chunk,
    UnfinishedOutputError,
    chunk_index,
    chunk_tokens,
    complete_chunks,
    config_hash,
    existing_config,
    finalize,
    prepare_output,
    remove_output,
    remove_temporaries,
    uncovered,
)
from .loader import Loader
from .store import Column, Features, TokenColumn, load, read_manifest
from .writer import CHUNKS, INDEX, ChunkWriter, chunk_name, file_names, write_chunk

__all__ = [
    "load", "read_manifest", "Features", "Column", "TokenColumn", "Loader", "ChunkWriter", "UnfinishedOutputError",
    "finalize", "prepare_output", "existing_config", "remove_output", "complete_chunks", "remove_temporaries",
    "uncovered", "file_names", "chunk_name", "write_chunk", "chunk_index", "chunk_tokens", "config_hash",
    "OutputLock", "OutputLockedError", "WriteError", "Chunk", "FORMAT", "VERSION", "MANIFEST", "RUN", "CHUNKS",
    "INDEX",
]  # fmt: skip
