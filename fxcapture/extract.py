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

import argparse
import contextlib
import fnmatch
import hashlib
import os
import queue
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from .distributed import Group
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

Reducer = Union[str, Callable[[Any], torch.Tensor], None]
CHUNK_BYTES = 16 * 2**20  # default chunk size on disk (and of the writer's buffer)
OUTPUT_KEY = "output"


# -- reducers (run on the device, before any copy) ----------------------------------------
def _over_positions(x: torch.Tensor, op: Callable[..., torch.Tensor]) -> torch.Tensor:
    """``op(x, dims)`` over the tokens of ``(B, N, C)`` or the positions of ``(B, C, *spatial)``."""
    if x.ndim == 3:
        return op(x, 1)
    if x.ndim >= 4:
        return op(x, tuple(range(2, x.ndim)))
    return x


def reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over positions: ``(B, N, C)`` tokens -> ``(B, C)``; ``(B, C, *spatial)`` -> ``(B, C)``."""
    return _over_positions(x, torch.mean)


def reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Max over positions, laid out as for :func:`reduce_mean`."""
    return _over_positions(x, torch.amax)


def reduce_cls(x: torch.Tensor) -> torch.Tensor:
    """The first token of ``(B, N, C)``: ``x[:, 0]``."""
    if x.ndim != 3:
        raise ValueError(f"'cls' takes the first token of a (batch, tokens, dim) value, got shape {tuple(x.shape)}")
    return x[:, 0]


def reduce_flatten(x: torch.Tensor) -> torch.Tensor:
    """``(B, ...)`` -> ``(B, prod(...))``."""
    return x.flatten(1) if x.ndim > 2 else x


REDUCERS: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "none": None,
    "mean": reduce_mean,
    "max": reduce_max,
    "cls": reduce_cls,
    "flatten": reduce_flatten,
}


def _reducer(how: Reducer) -> Callable[[Any], Any] | None:
    if how is None or callable(how):
        return how
    if isinstance(how, str) and how in REDUCERS:
        return REDUCERS[how]
    raise ValueError(f"unknown reducer {how!r}: use one of {', '.join(REDUCERS)} or a callable fn(value) -> tensor")


def _selects(selector: str, key: str, catalogue: Any) -> bool:
    if key == OUTPUT_KEY:
        return selector == key  # the model output is reduced only when named
    base = key.partition("@")[0]
    if selector in (key, base) or fnmatch.fnmatchcase(key, selector):
        return True
    if ":" in base and not any(c in selector for c in ".:%*?["):
        return base.rpartition(":")[2] == selector  # a bare local name, as in capture()
    if catalogue is None or key == OUTPUT_KEY:
        return False
    from .resolve import match

    try:
        return any(r.key == key for r in match(catalogue, selector))
    except (TypeError, ValueError):
        return False


def resolve_reducers(reduce: Any, keys: list[str], catalogue: Any = None) -> dict[str, Callable | None]:
    """One reducer per key. ``reduce`` is one reducer for all, or ``{selector: reducer}``
    where a selector is a key, a glob over keys, or a capture selector (``"attn"``).
    The first matching entry wins; keys no entry matches are stored as they are, and
    so is the model output (key ``"output"``) unless an entry names it."""
    if not isinstance(reduce, Mapping):
        fn = _reducer(reduce)
        return {key: None if key == OUTPUT_KEY else fn for key in keys}
    table: dict[str, Callable | None] = {}
    used: set[str] = set()
    for key in keys:
        table[key] = None
        for selector, how in reduce.items():
            if _selects(selector, key, catalogue):
                table[key] = _reducer(how)
                used.add(selector)
                break
    unused = [s for s in reduce if s not in used]
    if unused:
        raise ValueError(
            f"reduce has {', '.join(map(repr, unused))}, which selects none of the captured keys "
            f"{keys}; use a key, a glob over keys or a capture selector"
        )
    return table


def _apply(key: str, fn: Callable | None, value: Any, rows: int, dtype: torch.dtype | None) -> torch.Tensor:
    """Reduce one value, check it is ``(rows, ...)`` and cast it for storage."""
    if fn is not None:
        try:
            value = fn(value)
        except Exception as err:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"reducing {key!r} (value {shape}) failed: {err}") from err
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"{key!r} is a {type(value).__name__}, not a tensor: pass reduce={{{key!r}: fn}} with a "
            "function that returns one tensor (e.g. lambda v: v[0] for a tuple)"
        )
    if value.ndim == 0 or value.shape[0] != rows:
        raise ValueError(
            f"{key!r} has shape {tuple(value.shape)}, whose first dimension is not the batch "
            f"({rows} rows); pass reduce={{{key!r}: fn}} returning a (batch, ...) tensor"
        )
    if dtype is not None and value.is_floating_point():
        value = value.to(dtype)
    if value.dtype == torch.bfloat16:  # numpy has no bfloat16
        value = value.float()
    return value


# -- data --------------------------------------------------------------------------------
def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    values = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (tuple, list)) else ()
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def _model_inputs(batch: Any, inputs: Callable | None) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for the model: a tensor is the input, a tuple/list's first item
    is (labels are ignored), a dict gives keyword arguments; ``inputs(batch)`` overrides."""
    if inputs is not None:
        batch = inputs(batch)
        if isinstance(batch, (tuple, list)):
            return tuple(batch), {}
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return (batch[0],), {}
    raise TypeError(
        f"cannot make model inputs of a batch of type {type(batch).__name__}: batches must be a "
        "tensor, a tuple/list (inputs first) or a dict; or pass inputs=lambda batch: (args...)"
    )


def _rows(args: tuple, kwargs: dict) -> int:
    t = _first_tensor((args, kwargs))
    if t is None or t.ndim == 0:
        raise ValueError("a batch holds no tensor with a batch dimension: cannot count its rows")
    return t.shape[0]


@dataclass
class Batch:
    start: int  # global row of its first sample
    rows: int
    args: tuple
    kwargs: dict


class _DatasetSource:
    """A map-style dataset read in order: any row range can be loaded (resume, shards)."""

    def __init__(self, dataset: Any, batch_size: int, loader_kwargs: dict, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.loader_kwargs = dataset, batch_size, loader_kwargs
        n = len(dataset)
        self.total: int | None = n // batch_size * batch_size if drop_last else n

    def describe(self) -> str:
        return f"{type(self.dataset).__qualname__}[{len(self.dataset)}]"

    def files_hash(self) -> str | None:
        samples = getattr(self.dataset, "samples", None)  # torchvision ImageFolder
        if not isinstance(samples, list):
            return None
        return hashlib.sha256(repr(samples).encode()).hexdigest()[:16]

    def batches(self, ranges: list[tuple[int, int]], inputs: Callable | None, seen: dict) -> Iterator[Batch]:
        for lo, hi in ranges:
            subset = self.dataset if (lo, hi) == (0, len(self.dataset)) else Subset(self.dataset, range(lo, hi))
            loader = DataLoader(subset, batch_size=self.batch_size, shuffle=False, drop_last=False,
                                **self.loader_kwargs)  # fmt: skip
            row = lo
            for batch in loader:
                args, kwargs = _model_inputs(batch, inputs)
                n = _rows(args, kwargs)
                yield Batch(row, n, args, kwargs)
                row += n
            if row != hi:
                raise ValueError(
                    f"rows {lo}-{hi} of the dataset gave {row - lo} rows: the collate function changes row counts"
                )


class _IterableSource:
    """Any iterable of batches: read once, in order; rows already stored are skipped."""

    batch_size = 1
    total = None

    def __init__(self, data: Any) -> None:
        self.data = data

    def describe(self) -> str:
        n = len(self.data) if hasattr(self.data, "__len__") else "?"
        return f"{type(self.data).__qualname__}[{n} batches]"

    def files_hash(self) -> str | None:
        return None

    def batches(self, skip: int, inputs: Callable | None, seen: dict) -> Iterator[Batch]:
        row = 0
        for batch in self.data:
            args, kwargs = _model_inputs(batch, inputs)
            n = _rows(args, kwargs)
            if row + n > skip:
                if row < skip:  # this batch is partly stored already (batches changed size)
                    k = skip - row
                    args, kwargs = _map_tensors((args, kwargs), lambda t: t[k:] if t.ndim and t.shape[0] == n else t)
                    yield Batch(skip, n - k, args, kwargs)
                else:
                    yield Batch(row, n, args, kwargs)
            row += n
            seen["rows"] = row


def _loader_kwargs(loader: DataLoader) -> dict:
    kwargs = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                  timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                  multiprocessing_context=loader.multiprocessing_context, generator=loader.generator)  # fmt: skip
    if loader.num_workers > 0:
        kwargs.update(prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers)
    return kwargs


def _source(data: Any, batch_size: int, num_workers: int, pin_memory: bool) -> _DatasetSource | _IterableSource:
    from torch.utils.data import BatchSampler, SequentialSampler

    if isinstance(data, DataLoader):
        sequential = (
            not isinstance(data.dataset, IterableDataset)
            and data.batch_size is not None
            and type(data.sampler) is SequentialSampler
            and type(data.batch_sampler) is BatchSampler
        )
        if sequential:
            return _DatasetSource(data.dataset, data.batch_size, _loader_kwargs(data), data.drop_last)
        return _IterableSource(data)
    if isinstance(data, torch.Tensor) or (isinstance(data, Dataset) and not isinstance(data, IterableDataset)):
        kwargs = dict(num_workers=num_workers, pin_memory=pin_memory)
        return _DatasetSource(data, batch_size, kwargs)
    if not hasattr(data, "__iter__"):
        raise TypeError(f"data must be a DataLoader, a Dataset or an iterable of batches, got {type(data).__name__}")
    return _IterableSource(data)


# -- device to host ------------------------------------------------------------------------
class _ToHost:
    """Copies reduced values to the host. On CUDA into a pool of pinned buffers with
    ``non_blocking`` copies: the writer thread waits on the batch's event, the main thread
    goes on with the next batch and waits only when every buffer is in flight."""

    def __init__(self, device: torch.device, slots: int) -> None:
        self.device = device
        self._pool: queue.Queue = queue.Queue()
        for _ in range(slots):
            self._pool.put({})

    def __call__(self, values: dict[str, torch.Tensor]) -> tuple[dict, Callable | None, Callable | None]:
        if self.device.type == "cpu":
            return values, None, None
        if self.device.type != "cuda":
            return {k: v.cpu() for k, v in values.items()}, None, None
        slot = self._pool.get()
        host = {}
        for key, value in values.items():
            buf = slot.get(key)
            fits = buf is not None and buf.shape[0] >= value.shape[0] and buf.shape[1:] == value.shape[1:]
            if not fits or buf.dtype != value.dtype:
                buf = slot[key] = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            host[key] = buf[: value.shape[0]]
            host[key].copy_(value, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event.synchronize, lambda: self._pool.put(slot)


# -- configuration --------------------------------------------------------------------------
def _describe(obj: Any) -> Any:
    """A JSON-able, stable description (callables by qualified name)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if isinstance(obj, Mapping):
        return {str(k): _describe(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list, set)):
        return [_describe(v) for v in obj]
    if isinstance(obj, type):
        return f"{obj.__module__}.{obj.__qualname__}"
    if callable(obj):
        name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
        return f"{getattr(obj, '__module__', '?')}.{name}"
    return repr(obj)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's state: names, shapes, dtypes and a strided sample of every tensor.

    Exact (no float reduction), so every process and every run agree on it.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            flat = t.detach().reshape(-1)
            if flat.numel():
                sample = flat[:: max(1, flat.numel() // 4096)]
                if sample.is_complex():
                    sample = torch.view_as_real(sample)
                h.update(sample.to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]


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


# -- the loop --------------------------------------------------------------------------------
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
        to_host = _ToHost(self.device, self.max_pending + 2)
        reducers: dict[str, Callable | None] | None = None
        try:
            with torch.inference_mode(), _autocast(self.device, self.autocast):
                for batch in batches:
                    args, kwargs = _map_tensors((batch.args, batch.kwargs), self._to_device)
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
                    values = {k: _apply(k, reducers.get(k), v, batch.rows, self.dtype) for k, v in feats.items()}
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
    from .api import capture

    out = Path(out)
    device = torch.device(device) if device is not None else _model_device(model)
    store_dtype = _dtype(dtype)
    _autocast(device, autocast)  # checks the argument before any work
    group = Group.from_env(device)
    try:
        device = group.device(device)
        source = _source(data, batch_size, num_workers, pin_memory=device.type == "cuda")
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
            "names": _describe(names),
            "reduce": _describe(reduce),
            "output": bool(output),
            "dtype": _describe(store_dtype),
            "autocast": _describe(autocast or None),
            "inputs": _describe(inputs),
            "capture_options": _describe(capture_options),
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
                "fxcapture_version": _version(), "torch_version": torch.__version__,
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


def _version() -> str:
    from . import __version__

    return __version__


# -- data for the command line --------------------------------------------------------------
class SyntheticImages(Dataset):
    """``n`` random images, each seeded by its index: any shard or resumed run sees the same.

    Example::

        >>> SyntheticImages(100, (3, 224, 224))[7][0].shape
        torch.Size([3, 224, 224])
    """

    def __init__(self, n: int, size: tuple[int, int, int] = (3, 224, 224), seed: int = 0) -> None:
        self.n, self.size, self.seed = n, tuple(size), seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} synthetic images")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.randn(self.size, generator=g), 0


def image_transform(model: torch.nn.Module, size: int | None = None) -> Callable:
    """Resize, center crop, to tensor, normalize: timm's ``pretrained_cfg`` values when the
    model has them, ImageNet's otherwise; ``size`` defaults to the model's input size."""
    from torchvision import transforms

    from .models import input_size

    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = size or input_size(model)[-1]
    crop_pct = cfg.get("crop_pct", 0.875)
    mean = cfg.get("mean", (0.485, 0.456, 0.406))
    std = cfg.get("std", (0.229, 0.224, 0.225))
    return transforms.Compose([
        transforms.Resize(int(round(size / crop_pct))),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])  # fmt: skip


def cli_dataset(spec: str, model: torch.nn.Module, image_size: int | None = None, seed: int = 0) -> Dataset:
    """``synthetic:N`` or an image folder (one subfolder per class, torchvision ``ImageFolder``)."""
    from .models import input_size

    if spec.startswith("synthetic:"):
        count = spec.partition(":")[2]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--data {spec!r}: use synthetic:N with N a positive number of images")
        c, h, w = input_size(model)
        size = (c, image_size, image_size) if image_size else (c, h, w)
        return SyntheticImages(int(count), size, seed)
    root = Path(spec)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {spec!r}: no such folder (give an image folder or synthetic:N)")
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(root), transform=image_transform(model, image_size))
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"--data {spec!r}: {err} (an image folder holds one subfolder of images per class)"
        ) from err


def parse_reduce(values: list[str] | None) -> Any:
    """``["mean"]`` -> ``"mean"``; ``["layer4=mean", "cls"]`` -> ``{"layer4": "mean", "*": "cls"}``."""
    if not values:
        return None
    table: dict[str, str] = {}
    default = None
    for value in values:
        name, sep, how = value.rpartition("=")
        _reducer(how)  # a clear error for an unknown reducer
        if sep:
            table[name] = how
        else:
            default = how
    if not table:
        return default
    if default is not None:
        table["*"] = default
    return table


# -- `fxcapture extract` ----------------------------------------------------------------------
def add_cli_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--model", required=True,
                        help="SOURCE:NAME, e.g. torchvision:resnet50, timm:vit_small_patch16_224, demo:vit")
    parser.add_argument("--names", required=True, nargs="+", action="extend",
                        help="what to store: module paths, locals, globs (see `fxcapture names MODEL`)")
    parser.add_argument("--reduce", action="append", metavar="[NAME=]HOW",
                        help="mean, max, cls, flatten or none, for all names or NAME=HOW for one (repeatable)")
    parser.add_argument("--data", required=True, help="an image folder (one subfolder per class) or synthetic:N")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--weights", default=None, help="a state_dict file to load (default: random weights)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random weights (the same in every process and on resume)")
    parser.add_argument("--image-size", type=int, default=None, help="input size (default: the model's)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="DataLoader workers (default: 0 for synthetic data, else min(8, CPUs))")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16"], help="store values as this dtype")
    parser.add_argument("--autocast", action="store_true", help="run under torch.autocast")
    parser.add_argument("--output", action="store_true", help="store the model output too (key 'output')")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk file (default: ~16 MiB)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--no-resume", action="store_true", help="refuse to continue an unfinished output")  # fmt: skip


def run_cli(args: argparse.Namespace) -> int:
    from .models import build_model

    torch.manual_seed(args.seed)
    model = build_model(args.model, args.weights)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available (use --device cpu)")
    dataset = cli_dataset(args.data, model, args.image_size, args.seed)
    workers = args.num_workers
    if workers is None:
        workers = 0 if isinstance(dataset, SyntheticImages) else min(8, os.cpu_count() or 1)
    data_name = args.data if isinstance(dataset, SyntheticImages) else str(Path(args.data).resolve())
    started = time.perf_counter()
    try:
        feats = _cli_extract(args, model, dataset, device, workers, data_name)
    except KeyboardInterrupt:
        print(f"fxcapture extract: interrupted; {args.out} keeps its complete chunks: run the same "
              "command again to resume", file=sys.stderr)  # fmt: skip
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        seconds = time.perf_counter() - started
        rows = len(next(iter(feats.values())))
        print(f"wrote {rows} rows to {args.out} in {seconds:.1f} s ({rows / seconds:.1f} samples/s)")
        for key, array in feats.items():
            print(f"  {key}: {array.shape} {array.dtype}")
    return 0


def _cli_extract(args: argparse.Namespace, model: torch.nn.Module, dataset: Dataset, device: str,
                 workers: int, data_name: str) -> dict[str, np.ndarray]:  # fmt: skip
    return extract(
        model, list(args.names), dataset, out=args.out, reduce=parse_reduce(args.reduce), device=device,
        autocast=args.autocast or None, dtype=args.dtype, batch_size=args.batch_size, num_workers=workers,
        output=args.output, chunk_size=args.chunk_size, progress=False if args.no_progress else None,
        resume=not args.no_resume, overwrite=args.overwrite,
        model_name=args.model + (f" + {args.weights}" if args.weights else ""), data_name=data_name,
    )  # fmt: skip


__all__ = ["extract", "load", "resolve_reducers", "REDUCERS", "SyntheticImages", "model_fingerprint"]
