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
from itertools import repeat
from typing import Any, Callable

import torch

from .._util.internals import flatten_fn, pytree, tree_spec, unflatten_fn

# transformers.exporters.exporter_dynamo's flatten and unflatten of Cache objects (transformers 5)
_CONTEXT_FLATTEN = ("transformers.exporters.exporter_dynamo", "_pytree_flatten")
_IMPORTING_UNFLATTEN = ("transformers.exporters.exporter_dynamo", "_pytree_unflatten")


def _named(fn: Any) -> tuple:
    return getattr(fn, "__module__", None), getattr(fn, "__name__", None)


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
    if _named(unflatten) == _IMPORTING_UNFLATTEN:
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


Walker = Callable[[Any, list], bool]


def spec_walker(spec: pytree.TreeSpec) -> Walker:
    """A function ``walk(value, leaves)`` that appends the leaves of ``value`` to ``leaves``
    if ``value`` has the structure ``spec`` describes (``False`` if not, or not provably).

    ``pytree.tree_flatten`` then ``==`` on the specs says the same, but builds the whole
    context of every node first: a transformers ``Cache`` serialises itself to a JSON-like
    dict at each call. The walker compares such a node attribute by attribute against the
    context it was compiled from, and stops at the first difference. A caller checks it
    once against ``tree_flatten`` (the same leaves, in order) before trusting it.

    Example::

        >>> walk = spec_walker(pytree.tree_structure(((), {"ids": ids, "cache": cache})))
        >>> leaves = []
        >>> walk(((), {"ids": next_id, "cache": cache}), leaves)   # cache.layers[0].keys ...
        True
    """
    if spec.is_leaf():
        return _append_leaf
    children = [spec_walker(c) for c in spec.children()]
    kind, context = spec.type, spec.context
    if kind is collections.namedtuple:  # pytree's node of every namedtuple: its class is the context
        return _sequence(context, children)
    if kind in (tuple, list):
        return _sequence(kind, children)
    if kind is dict:
        return _mapping(list(context), children)
    flatten = flatten_fn(kind)
    matcher = _context_matcher(context) if _named(flatten) == _CONTEXT_FLATTEN else None
    if matcher is not None:  # a transformers object: its tensors are its children, in order
        return lambda v, out: type(v) is kind and matcher(v, out)

    def node(v: Any, out: list) -> bool:
        if type(v) is not kind:
            return False
        items, ctx = flatten(v)
        return ctx == context and len(items) == len(children) and all(map(_call, children, items, repeat(out)))

    return node


def _append(v: Any, out: list) -> bool:
    out.append(v)
    return True


def _append_leaf(v: Any, out: list) -> bool:
    """A leaf of pytree: anything but a registered node or a tuple (namedtuples are nodes)."""
    if type(v) in pytree.SUPPORTED_NODES or isinstance(v, tuple):
        return False
    out.append(v)
    return True


def _call(walk: Walker, v: Any, out: list) -> bool:
    return walk(v, out)


def _sequence(kind: type, parts: list[Walker]) -> Walker:
    """A walker for a ``kind`` (tuple, list, namedtuple class) of ``len(parts)`` items."""
    count = len(parts)
    return lambda v, out: type(v) is kind and len(v) == count and all(map(_call, parts, v, repeat(out)))


def _mapping(keys: list, parts: list[Walker]) -> Walker:
    """A walker for a plain dict with these keys, in this order."""
    return lambda v, out: type(v) is dict and list(v) == keys and all(map(_call, parts, v.values(), repeat(out)))


def _context_matcher(ctx: Any) -> Walker | None:
    """A walker for a value transformers' generic flatten turned into ``ctx``; ``None``
    for a context holding what the matcher does not compare (symbols, sets, mappings)."""
    if ctx is None or type(ctx) in (bool, int, float, str):
        kind = type(ctx)
        return lambda v, out: type(v) is kind and v == ctx
    if type(ctx) is list or (type(ctx) is dict and "_t" not in ctx):
        keys = list(range(len(ctx))) if type(ctx) is list else list(ctx)
        parts = [_context_matcher(ctx[k]) for k in keys]
        if None in parts:
            return None
        return _sequence(list, parts) if type(ctx) is list else _mapping(keys, parts)
    tag = ctx["_t"]
    if tag == "tensor":
        return lambda v, out: isinstance(v, torch.Tensor) and _append(v, out)
    if tag in ("dtype", "device"):
        value = getattr(torch, ctx["n"]) if tag == "dtype" else torch.device(ctx["s"])
        return lambda v, out: type(v) is type(value) and v == value
    if tag == "obj":
        cls, names = _resolve(ctx["p"]), list(ctx["s"])
        parts = [_context_matcher(ctx["s"][k]) for k in names]
        if None in parts or not hasattr(cls, "__dict__"):
            return None
        return lambda v, out: (
            type(v) is cls and list(vars(v)) == names and all(map(_call, parts, vars(v).values(), repeat(out)))
        )
    return None


_CONTAINERS = (tuple, list, dict)
_BUILTIN_CONTAINERS = (tuple, list, dict, collections.OrderedDict, collections.defaultdict, collections.deque)


def is_registered_object(x: Any) -> bool:
    """A pytree node of its own class, not one of Python's containers: a ``Cache``, a
    ``ModelOutput`` (such as the ``encoder_outputs`` that ``generate`` passes to T5)."""
    return type(x) in pytree.SUPPORTED_NODES and type(x) not in _BUILTIN_CONTAINERS


def _is_state_type(kind: Any) -> bool:
    return (isinstance(kind, type) and kind in pytree.SUPPORTED_NODES and kind not in _BUILTIN_CONTAINERS
            and not issubclass(kind, _CONTAINERS))  # fmt: skip


def is_state_object(x: Any) -> bool:
    """A registered object that is no container (not a dict subclass such as a
    ``ModelOutput``): a ``Cache`` of transformers, whose tensors are graph inputs and
    which the model updates."""
    return _is_state_type(type(x))


def state_objects(tree: Any) -> list:
    """The state objects in ``tree`` (not inside one another), in pytree order."""
    return [x for x in pytree.tree_leaves(tree, is_leaf=is_state_object) if is_state_object(x)]


def _by_type(given: list) -> dict[type, list]:
    pending: dict[type, list] = {}
    for x in given:
        pending.setdefault(type(x), []).append(x)
    return pending


def write_back(given: list, output: Any) -> Any:
    """``output`` with each state object replaced by the caller's object of the same type
    in ``given`` (the state objects of the call, :func:`state_objects`, paired in order),
    updated to the state the graph returned.

    A model updates the cache it is given and returns that very object; a graph returns
    a new object rebuilt from flat tensors. Writing the new state into the caller's
    object gives both what the model gives: ``out.cache is cache``, holding the new keys.

    Example::

        >>> out, feats = program.module(input_ids=next_id, cache=cache)
        >>> write_back([cache], out).cache is cache
        True
    """
    pending = _by_type(given)
    if not pending:
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
        waiting = pending.get(type(y))  # only state objects' types are there (no registry lookup,
        if not waiting:  # which dynamo would guard key by key)
            return y
        x = waiting.pop(0)
        _assign(x, y)
        return x

    return swap(output)


class StateOutput:
    """A graph's flat outputs to its ``(output, feats)``, writing the state objects of the
    output (``Rebuilt`` nodes) straight into the caller's objects: what
    :func:`write_back` gives, without building a new cache first. ``None`` from
    :meth:`of` when the output holds state objects of another kind.

    Example::

        >>> out, feats = StateOutput.of(spec)(graph(*flat), [cache])   # out.cache is cache
    """

    def __init__(self, outer: pytree.TreeSpec, cuts: list[tuple[int, int, RebuildContext]]) -> None:
        self.outer = outer
        # per node: first leaf, leaf count, context, and the class a caller's object must have
        # to be written into (None: a context of another kind, always built anew)
        self.cuts = [(first, count, ctx, ctx.classes[ctx.context["p"]] if ctx.context.get("_t") == "obj" else None)
                     for first, count, ctx in cuts]  # fmt: skip

    @classmethod
    def of(cls, spec: pytree.TreeSpec) -> "StateOutput | None":
        cuts: list = []
        if spec.type is not tuple or spec.num_children != 2:
            return None
        output, feats = spec.children()
        outer = tree_spec(spec.type, spec.context, [_collapse(output, cuts, [0]), feats])
        if not cuts or state_specs(outer):
            return None
        return cls(outer, cuts)

    def __call__(self, leaves: list, given: list) -> Any:
        pending, values, at = _by_type(given), [], 0
        for first, count, ctx, cls in self.cuts:
            values += leaves[at:first]
            own = leaves[first : first + count]  # the context numbers the node's own leaves
            objects = pending.get(cls)
            if objects:
                values.append(objects.pop(0))
                _write(values[-1], ctx.context, own, ctx.classes)
            else:  # no object of the caller's: the model would return a new one too
                values.append(_from_context(ctx.context, own, ctx.classes))
            at = first + count
        values += leaves[at:]
        return pytree.tree_unflatten(values, self.outer)


def _collapse(spec: pytree.TreeSpec, cuts: list, at: list) -> pytree.TreeSpec:
    """``spec`` with each ``Rebuilt`` node a leaf, recording where its leaves were."""
    if spec.is_leaf():
        at[0] += 1
        return spec
    if spec.type is Rebuilt:
        cuts.append((at[0], spec.num_leaves, spec.context))
        at[0] += spec.num_leaves
        return pytree.tree_structure(0)
    return tree_spec(spec.type, spec.context, [_collapse(c, cuts, at) for c in spec.children()])


def state_specs(spec: pytree.TreeSpec) -> list[pytree.TreeSpec]:
    """The nodes of state objects in ``spec`` (not inside one another): :func:`state_objects`
    of a spec."""
    if spec.is_leaf():
        return []
    if _is_state_type(spec.type):
        return [spec]
    return [s for child in spec.children() for s in state_specs(child)]


def _write(into: Any, ctx: dict, leaves: list, classes: dict[str, type]) -> None:
    """``_assign(into, _from_context(ctx, ...))`` without building what ``into`` already has."""
    attrs = into.__dict__
    for name, part in ctx["s"].items():
        old = attrs.get(name)
        if type(part) is list and type(old) is list and len(old) == len(part):
            for i, item in enumerate(part):
                if type(item) is dict and item.get("_t") == "obj" and type(old[i]) is classes[item["p"]]:
                    _write(old[i], item, leaves, classes)
                else:
                    old[i] = _from_context(item, leaves, classes)
        elif type(part) is dict and part.get("_t") == "obj" and type(old) is classes[part["p"]]:
            _write(old, part, leaves, classes)
        else:
            attrs[name] = _from_context(part, leaves, classes)


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


__all__ = ["Rebuilt", "RebuildContext", "Walker", "compilable_spec", "spec_walker", "is_registered_object", "is_state_object", "state_objects", "state_specs", "StateOutput", "write_back"]
