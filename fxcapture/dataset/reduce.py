"""Reducers: shrink each captured value on the device, before any copy.

A reducer is ``fn(value, mask)``: ``mask`` is the batch's ``attention_mask``
(``(batch, tokens)``, 1 for a real token, 0 for padding, left or right padded) or
``None``. The mask applies to a ``(batch, tokens, dim)`` value whose first two
dimensions are the mask's; any other value (images ``(B, C, H, W)``, attention maps
``(B, heads, N, N)``, tokens of another length) is reduced over all its positions.
A value that is a tuple (a module returning ``(hidden, cache)``) or a dict/``ModelOutput``
is reduced through its first tensor.

Example::

    >>> resolve_reducers({"layer4": "mean"}, ["layer3", "layer4"])["layer4"] is reduce_mean
    True
    >>> x, mask = torch.ones(2, 3, 4), torch.tensor([[1, 1, 0], [0, 1, 1]])
    >>> reduce_tokens(x, mask).lengths
    tensor([2, 2])
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping, Union

import torch

from .._util.tree import first_leaf
from ..core.records import Catalogue
from ..core.select import glob_match, is_glob, match
from .ragged import Ragged

OUTPUT_KEY = "output"

Reducer = Union[str, Callable[..., Any], None]
Mask = Union[torch.Tensor, None]


# -- reducers (run on the device, before any copy) ----------------------------------------
def _tensor(x: Any) -> torch.Tensor:
    """The value itself, or the first tensor of a tuple/list/dict output."""
    if isinstance(x, torch.Tensor):
        return x
    t = first_leaf(x)
    if t is None:
        raise ValueError(f"a {type(x).__name__} holding no tensor cannot be reduced")
    return t


def _token_mask(x: torch.Tensor, mask: Mask) -> torch.Tensor | None:
    """``mask`` as bool on ``x``'s device when it marks the tokens of ``(B, L, D)`` ``x``."""
    if mask is None or x.ndim != 3 or tuple(mask.shape) != tuple(x.shape[:2]):
        return None
    return mask.to(x.device, non_blocking=True).bool()


def _over_positions(x: torch.Tensor, op: Callable[..., torch.Tensor]) -> torch.Tensor:
    """``op(x, dims)`` over the tokens of ``(B, N, C)`` or the positions of ``(B, C, *spatial)``."""
    if x.ndim == 3:
        return op(x, 1)
    if x.ndim >= 4:
        return op(x, tuple(range(2, x.ndim)))
    return x


def _needs_tokens(x: torch.Tensor, name: str) -> None:
    if x.ndim != 3:
        other = "'mean', 'max' or 'flatten'" + (" (a feature map has no tokens)" if x.ndim >= 4 else "")
        raise ValueError(
            f"{name!r} picks tokens of a (batch, tokens, dim) value, got shape {tuple(x.shape)}: use {other}"
        )


def reduce_mean(x: Any, mask: Mask = None) -> torch.Tensor:
    """Mean over the real tokens of ``(B, N, C)`` (all of them without a mask) -> ``(B, C)``;
    over the positions of ``(B, C, *spatial)`` -> ``(B, C)``. A sample with no real
    token gives zeros."""
    x = _tensor(x)
    m = _token_mask(x, mask)
    if m is None:
        return _over_positions(x, torch.mean)
    wide = x.float() if x.element_size() < 4 else x  # sum half precision in float32
    total = (m.unsqueeze(1).to(wide.dtype) @ wide).squeeze(1)
    return (total / m.sum(1, keepdim=True).clamp_min(1)).to(x.dtype)


def reduce_max(x: Any, mask: Mask = None) -> torch.Tensor:
    """Max over the real tokens (padding ignored), laid out as for :func:`reduce_mean`."""
    x = _tensor(x)
    m = _token_mask(x, mask)
    if m is None:
        return _over_positions(x, torch.amax)
    return x.masked_fill(~m.unsqueeze(-1), float("-inf")).amax(1)


def _pick(x: torch.Tensor, m: torch.Tensor, last: bool) -> torch.Tensor:
    """The first or last real token of every sample: ``(B, L, D)`` -> ``(B, D)``."""
    positions = torch.arange(x.shape[1], device=x.device).expand_as(m)
    if last:
        index = torch.where(m, positions, -1).amax(1).clamp_min(0)
    else:
        index = torch.where(m, positions, x.shape[1]).amin(1).clamp_max(x.shape[1] - 1)
    return x[torch.arange(x.shape[0], device=x.device), index]


def _first(x: Any, mask: Mask, name: str) -> torch.Tensor:
    x = _tensor(x)
    _needs_tokens(x, name)
    m = _token_mask(x, mask)
    return x[:, 0] if m is None else _pick(x, m, last=False)


def reduce_first(x: Any, mask: Mask = None) -> torch.Tensor:
    """The first real token of ``(B, N, C)`` (``x[:, 0]`` without a mask), left padding included."""
    return _first(x, mask, "first")


def reduce_cls(x: Any, mask: Mask = None) -> torch.Tensor:
    """The first real token, by its transformer name: BERT's and ViT's ``[CLS]``."""
    return _first(x, mask, "cls")


def reduce_last(x: Any, mask: Mask = None) -> torch.Tensor:
    """The last real token of ``(B, N, C)`` (``x[:, -1]`` without a mask): what decoder
    language models use as a summary of the sequence."""
    x = _tensor(x)
    _needs_tokens(x, "last")
    m = _token_mask(x, mask)
    return x[:, -1] if m is None else _pick(x, m, last=True)


def reduce_tokens(x: Any, mask: Mask = None) -> Ragged:
    """Every real token of every sample, in order, no padding: a :class:`Ragged` of
    ``(real tokens, C)`` rows with one length per sample (all ``N`` without a mask)."""
    x = _tensor(x)
    _needs_tokens(x, "tokens")
    m = _token_mask(x, mask)
    if m is None:
        lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.int64, device=x.device)
        return Ragged(x.reshape(-1, x.shape[2]), lengths)
    return Ragged(x[m], m.sum(1, dtype=torch.int64))


def reduce_flatten(x: Any, mask: Mask = None) -> torch.Tensor:
    """``(B, ...)`` -> ``(B, prod(...))`` (padding included)."""
    x = _tensor(x)
    return x.flatten(1) if x.ndim > 2 else x


REDUCERS: dict[str, Callable[[Any, Mask], Any] | None] = {
    "none": None,
    "mean": reduce_mean,
    "max": reduce_max,
    "first": reduce_first,
    "cls": reduce_cls,
    "last": reduce_last,
    "tokens": reduce_tokens,
    "flatten": reduce_flatten,
}


@functools.lru_cache(maxsize=256)
def _signature_takes_mask(fn: Callable) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def takes_mask(fn: Callable) -> bool:
    """Does ``fn`` take the attention mask as a second argument (``fn(value, mask)``)?"""
    if any(fn is r for r in REDUCERS.values()):
        return True
    try:
        return _signature_takes_mask(fn)
    except TypeError:  # unhashable callable
        return _signature_takes_mask.__wrapped__(fn)


def check_reducer(how: Reducer) -> Callable[..., Any] | None:
    """The reducer function ``how`` names (``None``: store the value as it is)."""
    if how is None or callable(how):
        return how
    if isinstance(how, str) and how in REDUCERS:
        return REDUCERS[how]
    raise ValueError(
        f"unknown reducer {how!r}: use one of {', '.join(REDUCERS)} or a callable fn(value) -> tensor "
        "(or fn(value, mask) to see the attention mask)"
    )


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


def apply_reducer(
    key: str, fn: Callable | None, value: Any, rows: int, dtype: torch.dtype | None, mask: Mask = None
) -> torch.Tensor | Ragged:
    """Reduce one value (``fn(value, mask)`` or ``fn(value)``, see :func:`takes_mask`), check it
    is ``(rows, ...)`` (or a :class:`Ragged` of ``rows`` samples) and cast it for storage.

    ``mask`` is the batch's ``attention_mask`` or ``None``. A bfloat16 value is kept as
    bfloat16 only when ``dtype`` asks for it (numpy has no bfloat16: the store keeps it
    as raw 16-bit words); otherwise it becomes float32.

    Example::

        >>> x, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
        >>> apply_reducer("h", REDUCERS["last"], x, 2, None, mask).shape
        torch.Size([2, 8])
    """
    if fn is not None:
        try:
            value = fn(value, mask) if takes_mask(fn) else fn(value)
        except Exception as err:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"reducing {key!r} (value {shape}) failed: {err}") from err
    if isinstance(value, Ragged):
        if value.samples != rows:
            raise ValueError(f"{key!r} was reduced to {value.samples} samples for a batch of {rows} rows")
        return Ragged(_cast(key, value.values, dtype), value.lengths)
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
    return _cast(key, value, dtype)


def _cast(key: str, value: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and value.is_floating_point():
        if torch.finfo(dtype).max < torch.finfo(value.dtype).max:
            _check_range(key, value, dtype)
        value = value.to(dtype)
    if value.dtype == torch.bfloat16 and dtype != torch.bfloat16:  # numpy has no bfloat16
        value = value.float()
    return value


def _check_range(key: str, value: torch.Tensor, dtype: torch.dtype) -> None:
    """A finite value beyond ``dtype``'s range would be stored as ``inf``: refuse it by name.
    (One scalar read per key and batch, only when storing in a narrower range: float16.)"""
    if value.numel() == 0:
        return
    largest = torch.where(value.isfinite(), value.abs(), 0).amax()
    limit = torch.finfo(dtype).max
    if largest > limit:
        name = str(dtype).removeprefix("torch.")
        raise ValueError(
            f"{key!r} has values up to {largest.item():.6g}, beyond {name}'s largest {limit:.6g}: "
            f"dtype={name!r} would store them as inf; store it as 'bfloat16' (float32's range) or 'float32'"
        )
