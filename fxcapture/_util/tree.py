"""The one walk over nested values, for every container the package meets.

Tuples (named too: ``PackedSequence``), lists, dicts (transformers ``ModelOutput``
too), plain dataclasses, and any type registered with torch's pytree (transformers
``Cache`` objects once registered). Capture, edits and every tracer map, flatten and
search model inputs and outputs through these, so that each container is rebuilt as
its own type instead of crashing, turning into a plain tuple or being missed.

Example::

    >>> Pair = collections.namedtuple("Pair", "a b")
    >>> tree_map(lambda t: t * 2, Pair(torch.ones(1), 3))
    Pair(a=tensor([2.]), b=3)
    >>> leaves({"x": [torch.ones(1), "s"]})
    [tensor([1.])]
    >>> paths(Pair(torch.ones(1), 3))
    [(((<built-in function getitem>, 0),), tensor([1.]))]
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
from .internals import pytree  # SUPPORTED_NODES: the registered types

Leaf = type | tuple[type, ...]
# how to read one child of a container: (reader, key), reader(container, key) -> child
Step = tuple[Callable[[Any, Any], Any], Any]


def registered_child(value: Any, index: int) -> Any:
    """Child ``index`` of a container registered with torch's pytree (a graph op too)."""
    return pytree.SUPPORTED_NODES[type(value)].flatten_fn(value)[0][index]


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


def _rebuild_tuple(value: tuple, items: list) -> tuple:
    if hasattr(value, "_make"):  # a namedtuple: its own __new__ may check its fields
        return type(value)._make(items)
    if type(value) is tuple:
        return tuple(items)
    try:
        return type(value)(items)
    except TypeError:
        return tuple(items)


def children(value: Any) -> tuple[list[Step], list[Any], Callable[[list], Any]] | None:
    """``(steps, children, rebuild)`` of a container, ``None`` for a leaf.

    ``rebuild(new_children)`` makes a container of ``value``'s type; ``steps[i]`` reads
    child ``i`` (``operator.getitem``, ``getattr`` or :func:`registered_child`).
    """
    if isinstance(value, (tuple, list)):
        steps = [(operator.getitem, i) for i in range(len(value))]
        rebuild = list if isinstance(value, list) else (lambda items: _rebuild_tuple(value, items))
        return steps, list(value), rebuild
    if isinstance(value, dict):
        keys = list(value)
        return ([(operator.getitem, k) for k in keys], list(value.values()),
                lambda items: _rebuild_dict(value, dict(zip(keys, items))))  # fmt: skip
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = [f.name for f in dataclasses.fields(value) if f.init and hasattr(value, f.name)]
        return ([(getattr, n) for n in names], [getattr(value, n) for n in names],
                lambda items: dataclasses.replace(value, **dict(zip(names, items))))  # fmt: skip
    node = pytree.SUPPORTED_NODES.get(type(value))
    if node is not None:
        items, context = node.flatten_fn(value)
        items = list(items)
        return ([(registered_child, i) for i in range(len(items))], items,
                lambda new: node.unflatten_fn(new, context))  # fmt: skip
    return None


def _map(fn: Callable[[Any], Any], value: Any, is_leaf: Callable[[Any], bool]) -> Any:
    if is_leaf(value):
        return fn(value)
    parts = children(value)
    if parts is None:
        return value
    _, items, rebuild = parts
    new = [_map(fn, v, is_leaf) for v in items]
    if type(value) not in (tuple, list, dict) and all(a is b for a, b in zip(new, items)):
        return value  # unchanged: not rebuilt (a rebuild may run a validating __init__)
    return rebuild(new)


def _walk(value: Any, is_leaf: Callable[[Any], bool], found: list) -> list:
    if is_leaf(value):
        found.append(value)
        return found
    parts = children(value)
    if parts is not None:
        for v in parts[1]:
            _walk(v, is_leaf, found)
    return found


def tree_map(fn: Callable[[Any], Any], value: Any, leaf: Leaf = torch.Tensor) -> Any:
    """``value`` with ``fn`` applied to every leaf of type ``leaf``; containers keep their type."""
    return _map(fn, value, lambda v: isinstance(v, leaf))


def map_all(fn: Callable[[Any], Any], value: Any) -> Any:
    """``value`` with ``fn`` applied to every value that is not a container."""
    return _map(fn, value, lambda v: not is_container(v))


def all_leaves(value: Any) -> list[Any]:
    """Every value in ``value`` that is not a container, in order."""
    return _walk(value, lambda v: not is_container(v), [])


def leaves(value: Any, leaf: Leaf = torch.Tensor) -> list[Any]:
    """Every leaf of type ``leaf`` in ``value``, in order."""
    return _walk(value, lambda v: isinstance(v, leaf), [])


def paths(value: Any, leaf: Leaf = torch.Tensor, path: tuple[Step, ...] = ()) -> list[tuple[tuple[Step, ...], Any]]:
    """Every leaf of type ``leaf`` with the steps that read it from ``value``."""
    if isinstance(value, leaf):
        return [(path, value)]
    parts = children(value)
    if parts is None:
        return []
    steps, items, _ = parts
    return [found for step, v in zip(steps, items) for found in paths(v, leaf, path + (step,))]


def is_container(value: Any) -> bool:
    """Is ``value`` a container that :func:`tree_map` walks into?"""
    return children(value) is not None


def holds_tensors(value: Any) -> bool:
    """Is ``value`` a tensor, or a container the tree walk enters (a tuple, a dataclass, a
    ``ModelOutput``, a registered pytree) holding one? What a local must be to be captured.

    Example::

        >>> holds_tensors((torch.ones(1), 3)), holds_tensors(torch.Size([2])), holds_tensors(nn.ReLU())
        (True, False, False)
    """
    if isinstance(value, torch.Tensor):
        return True
    try:
        return bool(leaves(value))  # nothing for a value that is no container
    except Exception:  # a container whose flattening fails cannot be captured
        return False


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
