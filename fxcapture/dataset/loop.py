"""The loop of one process: batches through the extractor, reduced, copied, handed to the writer.

Example::

    >>> run = Loop(extractor, out, device, reduce="mean", output=False, dtype=None, autocast=None,
    ...            chunk_size=None, max_pending=4, bar=NoProgress())
    >>> run(source.batches([(0, 100)], None, {}))
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .._util.tree import tree_map
from .files import check_space, human_bytes
from .generation import generated_rows
from .ragged import Ragged
from .reduce import OUTPUT_KEY, apply_reducer, resolve_reducers
from .sources import Batch
from .transfer import ToHost
from .writer import ChunkWriter, file_names

CHUNK_BYTES = 16 * 2**20  # default chunk size on disk (and of the writer's buffer)
TOKEN_KEYS = ("input_ids", "positions", "generated")  # stored beside per-token keys


def autocast_context(device: torch.device, autocast: Any) -> contextlib.AbstractContextManager:
    if autocast is None or autocast is False:
        return contextlib.nullcontext()
    if autocast is True:
        return torch.autocast(device.type)
    dtype = autocast if isinstance(autocast, torch.dtype) else getattr(torch, str(autocast), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"autocast must be True, False or a dtype such as 'bfloat16', got {autocast!r}")
    return torch.autocast(device.type, dtype=dtype)


def token_columns(kwargs: dict, lengths: torch.Tensor) -> dict[str, Ragged]:
    """``input_ids`` and ``positions`` (0..len-1) of the real tokens of a text batch, as
    :class:`Ragged` values beside a per-token key (and ``generated`` for a batch of
    completions, see :mod:`.generation`); ``{}`` when the batch has no ids or its real
    tokens are not the ones the key counts."""
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        return {}
    mask = kwargs.get("attention_mask")
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(ids.device).bool()
    counts = real.sum(1)
    if counts.shape != lengths.shape or not torch.equal(counts.cpu(), lengths.cpu()):
        return {}
    positions = real.long().cumsum(1) - 1
    columns = {"input_ids": ids, "positions": positions, "generated": kwargs.get("generated")}
    return {k: Ragged(v[real], counts) for k, v in columns.items() if v is not None}


@dataclass
class Loop:
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
    max_tokens: int | None = None
    tokens_before: int = 0  # tokens already stored (resume of a token budget)
    todo_rows: int | None = None  # rows this run computes, when known (disk check)
    flush_seconds: float = 30.0
    generate: dict | None = None  # model.generate options: complete each prompt (see .generation)
    rows_done: int = 0
    tokens_done: int = 0
    seconds: float = 0.0
    specs: dict[str, tuple] = field(default_factory=dict)

    def __call__(self, batches: Iterator[Batch]) -> None:
        writer: ChunkWriter | None = None
        to_host = ToHost(self.device, self.max_pending + 2)
        reducers: dict[str, Callable | None] | None = None
        try:
            with torch.inference_mode(), autocast_context(self.device, self.autocast):
                for batch in batches:
                    if self.max_tokens is not None and self.tokens_before + self.tokens_done >= self.max_tokens:
                        break
                    args, kwargs = tree_map(self._to_device, (batch.args, batch.kwargs))
                    if self.generate is None:
                        out, feats = self.extractor(*args, **kwargs)
                    else:  # the completed sequences' tokens replace the prompts' ids and mask
                        feats, kwargs = generated_rows(self.extractor, kwargs, self.generate)
                    if self.output:
                        if OUTPUT_KEY in feats:
                            raise ValueError(
                                f"a captured key is called {OUTPUT_KEY!r}: give it an alias to store the output too"
                            )
                        feats = {OUTPUT_KEY: out, **feats}
                    if reducers is None:
                        reducers = resolve_reducers(self.reduce, list(feats), getattr(self.extractor, "catalogue", None))
                    mask = kwargs.get("attention_mask")  # reducers skip padding
                    values = {k: apply_reducer(k, reducers.get(k), v, batch.rows, self.dtype, mask=mask)
                              for k, v in feats.items()}  # fmt: skip
                    values.update(self._tokens(values, kwargs))
                    self._check(values)
                    if writer is None:
                        writer = self._writer(values, batch.rows)
                    host, ready, release = to_host(values)
                    writer.put(batch.start, host, ready, release)
                    self.rows_done += batch.rows
                    self.bar.update(batch.rows)
            if writer is not None:
                writer.close()
        except BaseException:  # Ctrl-C too: the rows already computed are written, whole
            if writer is not None:
                writer.abort()
            raise

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)

    def _tokens(self, values: dict[str, Any], kwargs: dict) -> dict[str, Ragged]:
        """Count tokens for the budget; ids and positions beside per-token keys."""
        ragged = [v for v in values.values() if isinstance(v, Ragged)]
        if not ragged:
            if self.max_tokens is not None:
                raise ValueError("max_tokens counts stored tokens: it needs a per-token reducer (reduce='tokens')")
            return {}
        self.tokens_done += int(ragged[0].lengths.sum())
        clash = [k for k in TOKEN_KEYS if k in values]
        if clash:
            raise ValueError(f"a captured key is called {clash[0]!r}, which per-token outputs store the "
                             "tokens' ids and positions under: give it an alias")  # fmt: skip
        return token_columns(kwargs, ragged[0].lengths)

    def _check(self, values: dict[str, Any]) -> None:
        specs = {k: _spec(v) for k, v in values.items()}
        if not self.specs:
            self.specs = specs
        elif specs != self.specs:
            changed = [k for k in set(specs) | set(self.specs) if specs.get(k) != self.specs.get(k)]
            k = changed[0]
            raise ValueError(
                f"{k!r} changed from (rows, {self.specs.get(k)}) to (rows, {specs.get(k)}) between batches: "
                "every row must have one shape and dtype; reduce it to a fixed shape (reduce='mean')"
            )

    def _writer(self, values: dict[str, Any], batch_rows: int) -> ChunkWriter:
        row_bytes = sum(_nbytes(v) for v in values.values()) / max(1, batch_rows) or 1
        if self.todo_rows and not any(isinstance(v, Ragged) for v in values.values()):
            needed = int(self.todo_rows * row_bytes * 1.01) + (64 << 10)
            check_space(self.out, needed, f"the {self.todo_rows} rows to compute ({human_bytes(row_bytes)} a row)")
        if self.chunk_size is not None:  # checked by extract before any work
            rows = self.chunk_size
        else:
            rows = max(1, int(CHUNK_BYTES // row_bytes))
            rows = max(batch_rows, rows // batch_rows * batch_rows)  # whole batches: resume keeps batches
        return ChunkWriter(self.out, rows, file_names(values), self.max_pending,
                           chunk_bytes=None if self.chunk_size else CHUNK_BYTES,
                           flush_seconds=self.flush_seconds).start()  # fmt: skip


def _spec(v: Any) -> tuple:
    if isinstance(v, Ragged):
        return ("per token", tuple(v.values.shape[1:]), v.values.dtype)
    return (tuple(v.shape[1:]), v.dtype)


def _nbytes(v: Any) -> int:
    t = v.values if isinstance(v, Ragged) else v
    return t.numel() * t.element_size()
