"""Device to host: copies of reduced values that do not stall the device.

Example::

    >>> to_host = ToHost(torch.device("cuda"), slots=6)
    >>> host, ready, release = to_host({"layer4": value})   # ready(): wait for the copy
"""

from __future__ import annotations

import queue
from typing import Callable

import torch


class ToHost:
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
