"""Sources: what ``extract`` reads, turned into numbered batches of model inputs.

A map-style dataset (or a sequential ``DataLoader`` over one) can load any row range,
for resume and shards; any other iterable is read once, in order. Map-style means any
object with ``__len__`` and ``__getitem__`` (a ``torch.utils.data.Dataset``, a
transformers/``datasets`` dataset, a numpy array), except a list or tuple, which is a
sequence of batches. A dataset with a ``collate_fn`` method (:class:`~.text.TextDataset`)
is batched with it.

Example::

    >>> source = make_source(SyntheticImages(10, (3, 32, 32)), batch_size=4, num_workers=0, pin_memory=False)
    >>> [b.rows for b in source.batches([(0, 10)], None, {})]
    [4, 4, 2]
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, SequentialSampler, Subset

from .._util.tree import first_leaf, tree_map


class DataError(ValueError):
    """Reading the data failed; the message names the dataset item (index, batch, rows)."""


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
    t = first_leaf((args, kwargs))
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
        name = getattr(self.dataset, "data_name", None)  # TextDataset: its settings and a token hash
        if callable(name):
            return str(name())
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
            for batch in self._load(loader, lo, hi):
                args, kwargs = _model_inputs(batch, inputs)
                n = _rows(args, kwargs)
                yield Batch(row, n, args, kwargs)
                row += n
            if row != hi:
                raise ValueError(
                    f"rows {lo}-{hi} of the dataset gave {row - lo} rows: the collate function changes row counts"
                )


    def _load(self, loader: DataLoader, lo: int, hi: int) -> Iterator[Any]:
        """The loader's batches; a failure names the dataset item that raised (read again
        here, in this process: a worker's error comes back as traceback text)."""
        batches, row = iter(loader), lo
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as err:
                raise self._item_error(err, row, min(row + self.batch_size, hi)) from err
            yield batch
            row += self.batch_size

    def _item_error(self, err: Exception, start: int, stop: int) -> "DataError":
        where = f"batch {start // self.batch_size}, rows {start}-{stop - 1}"
        for i in range(start, stop):
            try:
                self.dataset[i]
            except Exception as item_err:
                return DataError(f"dataset[{i}] ({where}) raised {type(item_err).__name__}: {item_err}")
        cause = str(err).strip().splitlines()[-1] if str(err).strip() else ""
        return DataError(
            f"loading {where} failed ({type(err).__name__}: {cause}), though each of its items loads alone: "
            "the collate_fn or a DataLoader worker failed"
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
                    args, kwargs = tree_map(lambda t: t[k:] if t.ndim and t.shape[0] == n else t, (args, kwargs))
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


def is_map_style(data: Any) -> bool:
    """Can ``data`` load any sample by index? Anything with ``__len__`` and ``__getitem__``
    but a list/tuple (batches), a dict, a string or an ``IterableDataset``."""
    if isinstance(data, torch.Tensor):
        return True
    if isinstance(data, (IterableDataset, list, tuple, Mapping, str, bytes)):
        return False
    return isinstance(data, Dataset) or (hasattr(data, "__len__") and hasattr(data, "__getitem__"))


def make_source(data: Any, batch_size: int, num_workers: int, pin_memory: bool) -> _DatasetSource | _IterableSource:
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
    if is_map_style(data):
        kwargs = dict(num_workers=num_workers, pin_memory=pin_memory)
        collate = getattr(data, "collate_fn", None)
        if callable(collate):
            kwargs["collate_fn"] = collate
        return _DatasetSource(data, batch_size, kwargs)
    if not hasattr(data, "__iter__"):
        raise TypeError(f"data must be a DataLoader, a Dataset or an iterable of batches, got {type(data).__name__}")
    return _IterableSource(data)


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
