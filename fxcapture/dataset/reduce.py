"""Reducers: shrink each captured value on the device, before any copy.

Example::

    >>> resolve_reducers({"layer4": "mean"}, ["layer3", "layer4"])["layer4"] is reduce_mean
    True
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import torch

from ..core.records import Catalogue
from ..core.select import glob_match, is_glob, match

OUTPUT_KEY = "output"

Reducer = Union[str, Callable[[Any], torch.Tensor], None]
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


def check_reducer(how: Reducer) -> Callable[[Any], Any] | None:
    if how is None or callable(how):
        return how
    if isinstance(how, str) and how in REDUCERS:
        return REDUCERS[how]
    raise ValueError(f"unknown reducer {how!r}: use one of {', '.join(REDUCERS)} or a callable fn(value) -> tensor")


def _selects(selector: str, key: str, catalogue: Catalogue | None) -> bool:
    """Does a ``reduce`` selector pick this stored key? The capture grammar, over the
    captured keys (a key, a glob, a bare local name) or the capture records."""
    if key == OUTPUT_KEY:
        return selector == key  # the model output is reduced only when named
    base = key.partition("@")[0]
    if selector in (key, base) or (is_glob(selector) and glob_match(selector, key)):
        return True
    if ":" in base and not any(c in selector for c in ".:%*?["):
        return base.rpartition(":")[2] == selector  # a bare local name, as in capture()
    if catalogue is None:
        return False
    return any(r.key == key for r in match(catalogue, selector))


def resolve_reducers(reduce: Any, keys: list[str], catalogue: Any = None) -> dict[str, Callable | None]:
    """One reducer per key. ``reduce`` is one reducer for all, or ``{selector: reducer}``
    where a selector is a key, a glob over keys, or a capture selector (``"attn"``).
    The first matching entry wins; keys no entry matches are stored as they are, and
    so is the model output (key ``"output"``) unless an entry names it."""
    if not isinstance(reduce, Mapping):
        fn = check_reducer(reduce)
        return {key: None if key == OUTPUT_KEY else fn for key in keys}
    table: dict[str, Callable | None] = {}
    used: set[str] = set()
    for key in keys:
        table[key] = None
        for selector, how in reduce.items():
            if _selects(selector, key, catalogue):
                table[key] = check_reducer(how)
                used.add(selector)
                break
    unused = [s for s in reduce if s not in used]
    if unused:
        raise ValueError(
            f"reduce has {', '.join(map(repr, unused))}, which selects none of the captured keys "
            f"{keys}; use a key, a glob over keys or a capture selector"
        )
    return table


def apply_reducer(key: str, fn: Callable | None, value: Any, rows: int, dtype: torch.dtype | None) -> torch.Tensor:
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
