"""A run's identity: stable descriptions of everything that changes its rows.

Example::

    >>> describe({"reduce": "mean", "fn": torch.mean})
    {'reduce': 'mean', 'fn': 'torch.mean'}
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

import torch


def describe(obj: Any) -> Any:
    """A JSON-able, stable description (callables by qualified name)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if isinstance(obj, Mapping):
        return {str(k): describe(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list, set)):
        return [describe(v) for v in obj]
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
