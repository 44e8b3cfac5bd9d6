"""Output structures that a compiled graph can rebuild.

A running trace returns the model's own output structure, rebuilt from flat values by
an output spec. transformers registers its ``Cache`` classes (``DynamicCache``) as
pytree nodes whose unflatten function finds each class by its dotted path with
``importlib`` on every call, which ``torch.compile(fullgraph=True)`` refuses. So the
spec of a graph's output is rewritten once, at build time: such a node becomes an
fxcapture node holding the same context and the classes already resolved, and its
unflatten rebuilds the same objects with no import. Every other node stays as it is.

Example::

    >>> spec = compilable_spec(out_spec)    # DynamicCache nodes -> Rebuilt nodes
    >>> pytree.tree_unflatten(leaves, spec)  # the same objects, traceable by dynamo
"""

from __future__ import annotations

import collections
import importlib
from dataclasses import dataclass
from typing import Any

import torch

from .._util.internals import pytree, tree_spec, unflatten_fn

# transformers.exporters.exporter_dynamo's unflatten of Cache objects (transformers 5)
_IMPORTING_UNFLATTEN = ("transformers.exporters.exporter_dynamo", "_pytree_unflatten")


class Rebuilt:
    """The pytree node type standing in for an object rebuilt from a context."""


@dataclass(frozen=True)
class RebuildContext:
    context: Any  # transformers' JSON-like context of the object
    classes: dict[str, type]  # "module:qualname" -> class, resolved at build time

    def __hash__(self) -> int:  # contexts hold lists and dicts: the spec needs no hashing of them
        return id(self)


def _flatten(value: Any) -> tuple[list, Any]:
    raise TypeError("Rebuilt nodes only occur in output specs; nothing is flattened into one")


def _unflatten(values: Any, ctx: RebuildContext) -> Any:
    return _from_context(ctx.context, list(values), ctx.classes)


pytree.register_pytree_node(Rebuilt, _flatten, _unflatten, serialized_type_name="fxcapture.core.pytrees.Rebuilt")


def compilable_spec(spec: pytree.TreeSpec) -> pytree.TreeSpec:
    """``spec`` with every node whose unflatten imports classes replaced by a :class:`Rebuilt`
    node that rebuilds the same object without importing (nodes it cannot vouch for stay)."""
    if spec.is_leaf():
        return spec
    children = [compilable_spec(c) for c in spec.children()]
    unflatten = unflatten_fn(spec.type)
    if (getattr(unflatten, "__module__", None), getattr(unflatten, "__name__", None)) == _IMPORTING_UNFLATTEN:
        rebuilt = _rebuilt_node(spec, children, unflatten)
        if rebuilt is not None:
            return rebuilt
    return tree_spec(spec.type, spec.context, children)


def _rebuilt_node(spec: pytree.TreeSpec, children: list, unflatten: Any) -> pytree.TreeSpec | None:
    try:
        classes: dict[str, type] = {}
        _collect_classes(spec.context, classes)
        context = RebuildContext(spec.context, classes)
        probe = [torch.zeros(()) for _ in range(spec.num_children)]
        ours, theirs = _unflatten(probe, context), unflatten(probe, spec.context)
    except Exception:  # a context of another format: keep the original node
        return None
    if type(ours) is not type(theirs) or _state(ours) != _state(theirs):
        return None
    return tree_spec(Rebuilt, context, children)


def _state(obj: Any) -> Any:
    """A comparable picture of an object: types and attribute names, recursively."""
    if isinstance(obj, torch.Tensor):
        return "tensor"
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, [_state(v) for v in obj])
    if isinstance(obj, dict):
        return (type(obj).__name__, {k: _state(v) for k, v in obj.items()})
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return (type(obj).__qualname__, {k: _state(v) for k, v in vars(obj).items()})
    return obj


def _resolve(path: str) -> type:
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _collect_classes(ctx: Any, found: dict[str, type]) -> None:
    if isinstance(ctx, dict):
        if ctx.get("_t") in ("map", "seq", "obj", "type") and isinstance(ctx.get("p"), str):
            found.setdefault(ctx["p"], _resolve(ctx["p"]))
        for value in ctx.values():
            _collect_classes(value, found)
    elif isinstance(ctx, list):
        for value in ctx:
            _collect_classes(value, found)


def _from_context(ctx: Any, leaves: list, classes: dict[str, type]) -> Any:
    """transformers' ``_unflatten_from_context`` with the classes looked up in ``classes``."""
    if ctx is None or type(ctx) in (bool, int, float, str):
        return ctx
    if type(ctx) is list:
        return [_from_context(v, leaves, classes) for v in ctx]
    if type(ctx) is dict and "_t" not in ctx:
        return {k: _from_context(v, leaves, classes) for k, v in ctx.items()}
    tag = ctx["_t"]
    if tag in ("tensor", "sym"):
        return leaves[ctx["i"]]
    if tag in ("dtype", "layout"):
        return getattr(torch, ctx["n"])
    if tag == "device":
        return torch.device(ctx["s"])
    if tag == "size":
        return torch.Size(ctx["v"])
    if tag == "items":
        return {k: _from_context(v, leaves, classes) for k, v in ctx["v"]}
    cls = classes[ctx["p"]]
    if tag == "type":
        return cls
    if tag == "map":
        return cls({k: _from_context(v, leaves, classes) for k, v in ctx["v"].items()})
    if tag == "seq":
        items = [_from_context(v, leaves, classes) for v in ctx["v"]]
        try:
            return cls(items)
        except TypeError:
            return cls(*items)  # a namedtuple
    if tag == "obj":
        instance = cls.__new__(cls)
        for k, v in ctx["s"].items():
            instance.__dict__[k] = _from_context(v, leaves, classes)
        return instance
    raise TypeError(f"unknown tag {tag!r} in an output context")


_CONTAINERS = (tuple, list, dict)
_BUILTIN_CONTAINERS = (tuple, list, dict, collections.OrderedDict, collections.defaultdict, collections.deque)


def is_registered_object(x: Any) -> bool:
    """A pytree node of its own class, not one of Python's containers: a ``Cache``, a
    ``ModelOutput`` (such as the ``encoder_outputs`` that ``generate`` passes to T5)."""
    return type(x) in pytree.SUPPORTED_NODES and type(x) not in _BUILTIN_CONTAINERS


def is_state_object(x: Any) -> bool:
    """A registered object that is no container (not a dict subclass such as a
    ``ModelOutput``): a ``Cache`` of transformers, whose tensors are graph inputs and
    which the model updates."""
    return is_registered_object(x) and not isinstance(x, _CONTAINERS)


def state_objects(tree: Any) -> list:
    """The state objects in ``tree`` (not inside one another), in pytree order."""
    return [x for x in pytree.tree_leaves(tree, is_leaf=is_state_object) if is_state_object(x)]


def write_back(inputs: Any, output: Any) -> Any:
    """``output`` with each state object replaced by the caller's object of the same type
    in ``inputs`` (paired in order), updated to the state the graph returned.

    A model updates the cache it is given and returns that very object; a graph returns
    a new object rebuilt from flat tensors. Writing the new state into the caller's
    object gives both what the model gives: ``out.cache is cache``, holding the new keys.

    Example::

        >>> out, feats = program.module(input_ids=next_id, cache=cache)
        >>> write_back({"cache": cache}, out).cache is cache
        True
    """
    given: dict[type, list] = {}
    for x in state_objects(inputs):
        given.setdefault(type(x), []).append(x)
    if not given:
        return output

    def swap(y: Any) -> Any:
        if isinstance(y, dict):  # in place: a ModelOutput keeps its fields and attributes
            for k, v in y.items():
                new = swap(v)
                if new is not v:
                    y[k] = new
            return y
        if isinstance(y, (list, tuple)):
            items = [swap(v) for v in y]
            if all(a is b for a, b in zip(items, y)):
                return y
            return type(y)(*items) if hasattr(y, "_fields") else type(y)(items)
        pending = given.get(type(y)) if is_state_object(y) else None
        if not pending:
            return y
        x = pending.pop(0)
        _assign(x, y)
        return x

    return swap(output)


def _assign(into: Any, new: Any) -> None:
    """Make ``into`` hold ``new``'s state, keeping ``into``'s own sub-objects (a cache's
    layers) where both have one of the same type."""
    for name, value in vars(new).items():
        old = into.__dict__.get(name)
        if isinstance(value, list) and isinstance(old, list) and len(old) == len(value):
            for i, (a, b) in enumerate(zip(old, value)):
                if type(a) is type(b) and hasattr(b, "__dict__") and not isinstance(b, torch.Tensor):
                    _assign(a, b)
                else:
                    old[i] = b
        elif type(old) is type(value) and hasattr(value, "__dict__") and not isinstance(value, (torch.Tensor, type)):
            _assign(old, value)
        else:
            into.__dict__[name] = value


__all__ = ["Rebuilt", "RebuildContext", "compilable_spec", "is_registered_object", "is_state_object", "state_objects", "write_back"]
