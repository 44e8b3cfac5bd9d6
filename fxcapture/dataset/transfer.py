"""Device to host: copies of reduced values that do not stall the device.

Example::

    >>> to_host = ToHost(torch.device("cuda"), slots=6)
    >>> host, ready, release = to_host({"layer4": value})   # ready(): wait for the copy
"""

from __future__ import annotations

import queue
from typing import Any, Callable

import torch

from .ragged import Ragged


class ToHost:
    """Copies reduced values to the host. On CUDA into a pool of pinned buffers with
    ``non_blocking`` copies: the writer thread waits on the batch's event, the main thread
    goes on with the next batch and waits only when every buffer is in flight."""

    def __init__(self, device: torch.device, slots: int) -> None:
        self.device = device
        self._pool: queue.Queue = queue.Queue()
        for _ in range(slots):
            self._pool.put({})

    def __call__(self, values: dict[str, Any]) -> tuple[dict, Callable | None, Callable | None]:
        """``(host values, ready, release)``: tensors, or :class:`Ragged` per-token values."""
        if self.device.type == "cpu":
            return values, None, None
        if self.device.type != "cuda":
            return {k: v.to("cpu") for k, v in values.items()}, None, None
        slot = self._pool.get()
        host: dict[str, Any] = {}
        for key, value in values.items():
            if isinstance(value, Ragged):
                host[key] = Ragged(_copy(slot, key, value.values), _copy(slot, key + "\0lengths", value.lengths))
            else:
                host[key] = _copy(slot, key, value)
        event = torch.cuda.Event()
        event.record()
        return host, event.synchronize, lambda: self._pool.put(slot)


def _copy(slot: dict, key: str, value: torch.Tensor) -> torch.Tensor:
    """A non-blocking copy into the slot's pinned buffer for ``key`` (grown by half when too small)."""
    buf = slot.get(key)
    fits = buf is not None and buf.shape[0] >= value.shape[0] and buf.shape[1:] == value.shape[1:]
    if not fits or buf.dtype != value.dtype:
        rows = value.shape[0] if buf is None or buf.shape[1:] != value.shape[1:] else int(value.shape[0] * 1.5)
        buf = slot[key] = torch.empty((rows, *value.shape[1:]), dtype=value.dtype, pin_memory=True)
    out = buf[: value.shape[0]]
    out.copy_(value, non_blocking=True)
    return out
