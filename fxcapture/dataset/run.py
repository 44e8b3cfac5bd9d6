"""Run a whole dataset through a model and store chosen intermediates on disk.

:func:`extract` builds an extractor with :func:`fxcapture.capture` (pruned after the
last captured value unless the model output is stored too), runs every batch under
``torch.inference_mode`` (optionally autocast), reduces each value on the device
(mean over tokens or positions, CLS token, flatten, or a callable), copies it to the
host without stalling the device (pinned buffers and ``non_blocking`` copies on
CUDA, synchronised by an event in the writer thread) and hands it to a background
writer that streams fixed-size chunks to disk while the next batch runs. Memory does
not grow with the dataset; a killed run resumes after its last complete chunk; under
``torchrun`` each process takes its shard (see :mod:`fxcapture.distributed`).

Example::

    >>> from fxcapture import extract, load
    >>> loader = DataLoader(ImageFolder("images/", transform), batch_size=64, num_workers=8)
    >>> extract(resnet50, ["layer3", "layer4"], loader, out="feats/", reduce="mean", device="cuda")
    >>> load("feats/")["layer4"].shape         # memory-mapped, rows in dataset order
    (50000, 2048)

Command line::

    fxcapture extract --model torchvision:resnet50 --names layer4 --reduce mean \\
        --data images/ --out feats/ --batch-size 64 --device cuda
    torchrun --nproc-per-node 8 -m fxcapture.cli extract ...      # one shard per GPU
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from .._util.tree import tree_map
from .._version import __version__
from ..core.api import capture
from .distributed import Group
from .identity import describe, model_fingerprint
from .reduce import OUTPUT_KEY, Reducer, apply_reducer, resolve_reducers
from .sources import Batch, make_source
from .storage import (
    ChunkWriter,
    complete_chunks,
    file_names,
    finalize,
    load,
    prepare_output,
    remove_temporaries,
    uncovered,
)
from .transfer import ToHost

CHUNK_BYTES = 16 * 2**20  # default chunk size on disk (and of the writer's buffer)


def _dtype(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        dtype = value
    else:
        dtype = getattr(torch, str(value).removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {value!r}: use e.g. 'float16' or 'float32'")
    if dtype == torch.bfloat16:
        raise ValueError("numpy has no bfloat16: store features as float16 or float32")
    return dtype


def _autocast(device: torch.device, autocast: Any) -> contextlib.AbstractContextManager:
    if autocast is None or autocast is False:
        return contextlib.nullcontext()
    if autocast is True:
        return torch.autocast(device.type)
    dtype = autocast if isinstance(autocast, torch.dtype) else getattr(torch, str(autocast), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"autocast must be True, False or a dtype such as 'bfloat16', got {autocast!r}")
    return torch.autocast(device.type, dtype=dtype)


# -- progress ------------------------------------------------------------------------------
class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(enabled: bool | None, total: int | None, desc: str) -> Any:
    """A tqdm bar in samples/s; ``None``: only when stderr is a terminal."""
    if enabled is False or (enabled is None and not sys.stderr.isatty()):
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError as err:
        if enabled:
            raise ImportError('progress=True needs tqdm: pip install tqdm') from err
        return _NoBar()
    return tqdm(total=total, unit="samples", desc=desc, dynamic_ncols=True, smoothing=0.1)


@dataclass
class _Run:
    """What one process does: run its batches, stream them to the writer."""

    extractor: torch.nn.Module
    out: Path
    device: torch.device
    reduce: Any
    output: bool
    dtype: torch.dtype | None
    autocast: Any
    chunk_size: int | None
    max_pending: int
    bar: Any
    rows_done: int = 0
    specs: dict[str, tuple] = field(default_factory=dict)

    def __call__(self, batches: Iterator[Batch]) -> None:
        writer: ChunkWriter | None = None
        to_host = ToHost(self.device, self.max_pending + 2)
        reducers: dict[str, Callable | None] | None = None
        try:
            with torch.inference_mode(), _autocast(self.device, self.autocast):
                for batch in batches:
                    args, kwargs = tree_map(self._to_device, (batch.args, batch.kwargs))
                    out, feats = self.extractor(*args, **kwargs)
                    if self.output:
                        if OUTPUT_KEY in feats:
                            raise ValueError(
                                f"a captured key is called {OUTPUT_KEY!r}: give it an alias to store the output too"
                            )
                        feats = {OUTPUT_KEY: out, **feats}
                    if reducers is None:
                        catalogue = getattr(self.extractor, "catalogue", None)
                        reducers = resolve_reducers(self.reduce, list(feats), catalogue)
                    mask = kwargs.get("attention_mask")  # reducers skip padding
                    values = {k: apply_reducer(k, reducers.get(k), v, batch.rows, self.dtype, mask=mask)
                              for k, v in feats.items()}  # fmt: skip
                    self._check(values)
                    if writer is None:
                        writer = ChunkWriter(self.out, self._chunk_rows(values, batch.rows),
                                             file_names(values), self.max_pending).start()  # fmt: skip
                    host, ready, release = to_host(values)
                    writer.put(batch.start, host, ready, release)
                    self.rows_done += batch.rows
                    self.bar.update(batch.rows)
            if writer is not None:
                writer.close()
        except BaseException:  # Ctrl-C too: only complete chunks stay on disk
            if writer is not None:
                writer.abort()
            raise

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)

    def _check(self, values: dict[str, torch.Tensor]) -> None:
        specs = {k: (tuple(v.shape[1:]), v.dtype) for k, v in values.items()}
        if not self.specs:
            self.specs = specs
        elif specs != self.specs:
            changed = [k for k in set(specs) | set(self.specs) if specs.get(k) != self.specs.get(k)]
            k = changed[0]
            raise ValueError(
                f"{k!r} changed from (rows, {self.specs.get(k)}) to (rows, {specs.get(k)}) between batches: "
                "every row must have one shape and dtype; reduce it to a fixed shape (reduce='mean')"
            )

    def _chunk_rows(self, values: dict[str, torch.Tensor], batch_rows: int) -> int:
        if self.chunk_size is not None:
            if self.chunk_size < 1:
                raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
            return self.chunk_size
        row_bytes = sum(v[0].numel() * v.element_size() for v in values.values()) or 1
        rows = max(1, CHUNK_BYTES // row_bytes)
        return max(batch_rows, rows // batch_rows * batch_rows)  # whole batches: resume keeps batches


def extract(
    model: torch.nn.Module,
    names: Any,
    data: Any,
    *,
    out: str | os.PathLike,
    reduce: Reducer | Mapping[str, Reducer] = None,
    device: str | torch.device | None = None,
    autocast: bool | str | torch.dtype | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    output: bool = False,
    inputs: Callable[[Any], Any] | None = None,
    chunk_size: int | None = None,
    progress: bool | None = None,
    resume: bool = True,
    overwrite: bool = False,
    model_name: str | None = None,
    data_name: str | None = None,
    capture_options: Mapping[str, Any] | None = None,
    max_pending: int = 4,
) -> dict[str, np.ndarray]:
    """Run ``data`` through ``model`` and store the values ``names`` selects under ``out``.

    Args:
        model: the model; it is moved to ``device``, run in eval mode (its train/eval
            flags are restored afterwards) and otherwise untouched.
        names: selectors as for :func:`fxcapture.capture` (``"layer4"``, ``"attn"``,
            ``{"feat": "blocks.11"}``).
        data: a ``DataLoader``, a map-style ``Dataset`` (batched with ``batch_size``
            and ``num_workers``), a tensor of samples, or any iterable of batches. A
            batch is a tensor (the input), a tuple/list (its first item is the input:
            labels are ignored) or a dict (keyword arguments); ``inputs(batch)`` may
            return the positional arguments (tuple) or keyword arguments (dict) instead.
            Rows are stored in the order the data yields them.
        out: output directory (see :mod:`fxcapture.storage` for the layout).
        reduce: applied on the device before the copy: ``"mean"`` (over tokens of
            ``(B, N, C)`` or positions of ``(B, C, H, W)``), ``"max"``, ``"cls"``
            (``x[:, 0]``), ``"flatten"``, ``"none"``, a callable ``fn(value) -> tensor``,
            or ``{selector: reducer}`` per key (keys, globs, or capture selectors). The
            model output is stored whole unless ``{"output": reducer}`` is given.
        device: where the model runs (default: where its parameters are).
        autocast: ``True`` or a dtype: run under ``torch.autocast``.
        dtype: store floating values as this dtype (``"float16"`` halves the copies).
        output: also store the model output, under the key ``"output"``; otherwise the
            graph is pruned after the last captured value.
        chunk_size: rows per chunk (default: whole batches filling about 16 MiB).
        progress: a tqdm bar in samples/s; default: only when stderr is a terminal.
        resume: continue an unfinished run of the same configuration in ``out`` (one
            killed or stopped with Ctrl-C: its complete chunks are kept, the rest is run).
        overwrite: replace an existing output (of any configuration).
        model_name, data_name: how the manifest names the model and the data (the
            configuration also holds a fingerprint of the weights).
        capture_options: more arguments of :func:`fxcapture.capture` (``leaf_modules``...).
        max_pending: batches queued for the writer before the loop waits for the disk.

    Returns:
        ``fxcapture.load(out)``: ``{key: array}`` memory-mapped, rows in dataset order.

    Under ``torchrun`` (``WORLD_SIZE > 1``) every process takes a contiguous shard of
    a ``Dataset`` or sequential ``DataLoader``, writes its own chunks, and rank 0
    finishes the output; every rank returns the whole result.

    Example::

        >>> feats = extract(vit, {"cls": "blocks.11"}, dataset, out="feats/", reduce="cls",
        ...                 batch_size=128, device="cuda", autocast=True)
        >>> feats["cls"].shape
        (10000, 768)
    """
    out = Path(out)
    device = torch.device(device) if device is not None else _model_device(model)
    store_dtype = _dtype(dtype)
    _autocast(device, autocast)  # checks the argument before any work
    group = Group.from_env(device)
    try:
        device = group.device(device)
        source = make_source(data, batch_size, num_workers, pin_memory=device.type == "cuda")
        if source.total == 0:
            raise ValueError("data holds no rows (an empty dataset): nothing to extract")
        if group.world_size > 1 and source.total is None:
            raise ValueError(
                "under torch.distributed, data must be a map-style Dataset or a DataLoader over one "
                "with a sequential sampler, so that every process loads only its shard; "
                f"got {type(data).__name__}"
            )
        config = {
            "model": model_name or type(model).__qualname__,
            "model_fingerprint": model_fingerprint(model),
            "names": describe(names),
            "reduce": describe(reduce),
            "output": bool(output),
            "dtype": describe(store_dtype),
            "autocast": describe(autocast or None),
            "inputs": describe(inputs),
            "capture_options": describe(capture_options),
            "data": data_name or source.describe(),
            "data_files": source.files_hash(),
            "rows": source.total,
        }
        extractor = capture(model, names, keep_output=bool(output), **dict(capture_options or {}))
        if extractor.names and not getattr(extractor, "untraced", None):  # all keys known: check now
            resolve_reducers(reduce, [OUTPUT_KEY] * bool(output) + extractor.names, extractor.catalogue)
        # rank 0 prepares the directory first; the others check it once it is ready
        state = prepare_output(out, config, resume=resume, overwrite=overwrite) if group.primary else None
        group.barrier()
        if not group.primary:
            state = prepare_output(out, config, resume=resume, overwrite=overwrite, primary=False)
        if state == "finished":
            return load(out)

        previous = {m: m.training for m in model.modules()}
        model.to(device)
        extractor.eval()
        try:
            seen: dict[str, int] = {}
            if source.total is not None:
                lo, hi = group.shard(source.total, align=source.batch_size)
                remove_temporaries(out, lo, hi)
                todo = uncovered(complete_chunks(out), lo, hi)
                batches = source.batches(todo, inputs, seen)
                todo_rows = sum(b - a for a, b in todo)
            else:
                remove_temporaries(out)
                skip = _stored_prefix(out)
                batches = source.batches(skip, inputs, seen)
                todo_rows = None
            desc = f"extract (rank 0 of {group.world_size})" if group.world_size > 1 else "extract"
            bar = _progress_bar(progress, todo_rows, desc) if group.primary else _NoBar()
            run = _Run(extractor, out, device, reduce, bool(output), store_dtype, autocast, chunk_size,
                       max_pending, bar)  # fmt: skip
            started = time.perf_counter()
            try:
                run(batches)
            finally:
                bar.close()
            elapsed = time.perf_counter() - started
        finally:
            for module, training in previous.items():
                module.training = training
        group.barrier()
        if group.primary:
            total = source.total if source.total is not None else seen.get("rows", 0)
            if total == 0:
                raise ValueError("data holds no rows: nothing to extract")
            finalize(out, total, extra={
                "fxcapture_version": __version__, "torch_version": torch.__version__,
                "world_size": group.world_size,
                "last_run": {"rows": run.rows_done, "seconds": round(elapsed, 3),
                             "device": str(device)},
            })  # fmt: skip
        group.barrier()
        return load(out)
    finally:
        group.close()


def _stored_prefix(out: Path) -> int:
    """Rows ``[0, n)`` already in complete chunks; later chunks (after a gap) are dropped."""
    chunks = complete_chunks(out)
    gaps = uncovered(chunks, 0, 2**62)
    skip = gaps[0][0]
    for c in chunks:
        if c.start >= skip:
            shutil.rmtree(c.path, ignore_errors=True)
    return skip


def _model_device(model: torch.nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


__all__ = ["extract", "load"]
