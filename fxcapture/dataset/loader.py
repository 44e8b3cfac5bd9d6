"""Training batches out of a stored column: :meth:`Features.loader` (see :mod:`.store`).

Blocks of rows (each within one chunk, at most 32 MiB) are read sequentially in a
shuffled order and their rows shuffled within a few blocks: disk-speed reads, an order
close to a full shuffle, a new one each epoch.

Example::

    >>> for batch in load("feats/").loader("layer4", batch_size=4096, shuffle=True, seed=0):
    ...     probe_step(batch)
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch


class Loader:
    """Iterable over shuffled batches of a :class:`Column`; a new order each epoch."""

    def __init__(self, col: Any, batch_size: int, shuffle: bool, seed: int | None, buffer_blocks: int,
                 drop_last: bool, dtype: torch.dtype | None) -> None:  # fmt: skip
        if batch_size < 1 or buffer_blocks < 1:
            raise ValueError(f"batch_size and buffer_blocks must be >= 1, got {batch_size}, {buffer_blocks}")
        self.col, self.batch_size, self.shuffle, self.drop_last, self.dtype = col, batch_size, shuffle, drop_last, dtype
        self.buffer_blocks = buffer_blocks
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        n = len(self.col)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        blocks = self.col.blocks()
        order = self._rng.permutation(len(blocks)) if self.shuffle else range(len(blocks))
        raw = self.col.raw
        carry = None
        for g in range(0, len(blocks), self.buffer_blocks):
            pieces = [raw[slice(*blocks[i])] for i in order[g : g + self.buffer_blocks]]
            block = np.concatenate(([carry] if carry is not None else []) + pieces)
            if self.shuffle:
                block = block[self._rng.permutation(len(block))]
            full = len(block) // self.batch_size * self.batch_size
            for i in range(0, full, self.batch_size):
                yield self._tensor(block[i : i + self.batch_size])
            carry = block[full:] if full < len(block) else None
        if carry is not None and not self.drop_last:
            yield self._tensor(carry)

    def _tensor(self, values: np.ndarray) -> torch.Tensor:
        if self.col.stored_dtype == "bfloat16":
            t = torch.from_numpy(np.ascontiguousarray(values).view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(np.ascontiguousarray(values))
        return t if self.dtype is None else t.to(self.dtype)


__all__ = ["Loader"]
