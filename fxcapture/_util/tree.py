"""One walk over nested values: tuples (named too), lists, dicts, dataclasses.

Every package maps, flattens or searches model inputs and outputs through these, so
that a namedtuple, a dataclass or a transformers ``ModelOutput`` is rebuilt as its
own type instead of crashing or turning into a plain tuple.

Example::

    >>> Pair = collections.namedtuple("Pair", "a b")
    >>> tree_map(lambda t: t * 2, Pair(torch.ones(1), 3))
    Pair(a=tensor([2.]), b=3)
    >>> leaves({"x": [torch.ones(1), "s"]})
    [tensor([1.])]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.fx as fx

Leaf = type | tuple[type, ...]


def _rebuild_dict(value: dict, items: dict) -> dict:
    if type(value) is dict:
        return items
    if dataclasses.is_dataclass(value):  # transformers ModelOutput: a dict and a dataclass
        try:
            return type(value)(**items)
        except TypeError:
            pass
    try:
        return type(value)(items)
    except TypeError:
        return items


def _map(fn: Callable[[Any], Any], value: Any, is_leaf: Callable[[Any], bool]) -> Any:
    if is_leaf(value):
        return fn(value)
    if isinstance(value, tuple):
        items = [_map(fn, v, is_leaf) for v in value]
        if hasattr(value, "_fields"):  # namedtuple
            return type(value)(*items)
        if type(value) is tuple:
            return tuple(items)
        try:
            return type(value)(items)
        except TypeError:
            return tuple(items)
    if isinstance(value, list):
        return [_map(fn, v, is_leaf) for v in value]
    if isinstance(value, dict):
        return _rebuild_dict(value, {k: _map(fn, v, is_leaf) for k, v in value.items()})
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {
            f.name: _map(fn, getattr(value, f.name), is_leaf)
            for f in dataclasses.fields(value)
            if f.init and hasattr(value, f.name)
        }
        return dataclasses.replace(value, **changes)
    return value


def tree_map(fn: Callable[[Any], Any], value: Any, leaf: Leaf = torch.Tensor) -> Any:
    """``value`` with ``fn`` applied to every leaf of type ``leaf``; containers keep their type."""
    return _map(fn, value, lambda v: isinstance(v, leaf))


def all_leaves(value: Any) -> list[Any]:
    """Every value in ``value`` that is not a container, in order."""
    found: list[Any] = []
    _map(found.append, value, lambda v: not is_container(v))
    return found


def leaves(value: Any, leaf: Leaf = torch.Tensor) -> list[Any]:
    """Every leaf of type ``leaf`` in ``value``, in order."""
    found: list[Any] = []
    tree_map(found.append, value, leaf)
    return found


def is_container(value: Any) -> bool:
    """Is ``value`` a container that :func:`tree_map` walks into?"""
    return isinstance(value, (tuple, list, dict)) or (
        dataclasses.is_dataclass(value) and not isinstance(value, type)
    )


def first_leaf(value: Any, leaf: Leaf = torch.Tensor) -> Any:
    """The first leaf of type ``leaf`` in ``value``, or ``None``."""
    found = leaves(value, leaf)
    return found[0] if found else None


def map_nodes(fn: Callable[[fx.Node], Any], value: Any) -> Any:
    """:func:`tree_map` over the ``fx.Node`` leaves of a value recorded while tracing."""
    return tree_map(fn, value, fx.Node)


def nodes(value: Any) -> list[fx.Node]:
    """The ``fx.Node`` leaves of ``value``."""
    return leaves(value, fx.Node)
