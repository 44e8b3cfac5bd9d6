"""Values with a different number of rows per sample: the real tokens of a text batch.

A reducer such as ``"tokens"`` returns a :class:`Ragged`: the rows of every sample of
the batch, one after the other, and how many rows each sample has. The store keeps
them flat, with offsets, so that a token store is one ``(total_tokens, dim)`` array.

Example::

    >>> r = Ragged(torch.randn(7, 64), torch.tensor([3, 4]))
    >>> [part.shape[0] for part in r.split()]
    [3, 4]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Ragged:
    """``values[offsets[i]:offsets[i+1]]`` are sample ``i``'s rows (``lengths[i]`` of them)."""

    values: torch.Tensor  # (sum(lengths), ...)
    lengths: torch.Tensor  # (batch,) int64

    def __post_init__(self) -> None:
        if self.lengths.ndim != 1:
            raise ValueError(f"lengths must be 1-D (one per sample), got shape {tuple(self.lengths.shape)}")
        total = int(self.lengths.sum())
        if self.values.shape[0] != total:
            raise ValueError(
                f"{self.values.shape[0]} rows for lengths summing to {total}: a Ragged value "
                "holds exactly the rows its lengths count"
            )

    @property
    def samples(self) -> int:
        return int(self.lengths.shape[0])

    def split(self) -> list[torch.Tensor]:
        """One tensor per sample."""
        return list(torch.split(self.values, self.lengths.tolist()))

    def to(self, *args, **kwargs) -> "Ragged":
        return Ragged(self.values.to(*args, **kwargs), self.lengths.to(self.lengths.device))
