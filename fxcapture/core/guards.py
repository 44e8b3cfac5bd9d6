"""Which inputs a running trace holds for.

``torch.export`` specialises a graph to what the example showed: the structure of the
arguments, every Python value (flags, ``None``), dtypes, devices, the rank of every
tensor and each dimension that is not dynamic; dynamic dimensions (batch, sequence)
get a range, and dimensions that must be equal share one symbol. :class:`InputGuard`
checks a call against all of that in a few microseconds; a call outside the guards
is traced again (the extractor keeps one graph per guard set).

Example::

    >>> guard.accepts((), {"input_ids": ids, "attention_mask": mask})
    True
"""

from __future__ import annotations

import itertools
import operator
import types
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from .._util.internals import pytree

from .frames import is_user_hook

from .pytrees import spec_walker, state_objects


@dataclass(frozen=True)
class _TensorSpec:
    dtype: torch.dtype
    device: torch.device
    dims: tuple  # an int (static) or a symbol name (dynamic) per dimension


def _first_tensor(model: torch.nn.Module) -> torch.Tensor | None:
    return next(itertools.chain(model.parameters(), model.buffers()), None)


def _probe(t: torch.Tensor | None) -> tuple | None:
    """dtype and device of the model's first tensor: a graph bakes them in casts."""
    return None if t is None else (t.dtype, t.device)


def _dim(size: Any) -> int | str | None:
    """A static size, the name of a dynamic one, or ``None`` for an expression of symbols
    (a ``SymInt`` export proved constant, such as the heads of a cache, is static)."""
    if isinstance(size, int):
        return size
    expr = size.node.expr
    if expr.is_number:
        return int(expr)
    name = str(expr)
    return name if name.isidentifier() else None


def _same_value(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:  # objects without a plain equality: the same object only
        return a is b


class InputGuard:
    """The inputs a running trace holds for (see the module docstring)."""

    def __init__(self, spec: Any, leaves: list, ranges: dict[str, tuple], model: torch.nn.Module) -> None:
        self.spec = spec
        self.leaves = leaves
        self.ranges = ranges
        # the very tensor, not looked up again per call: the model guard checked beside
        # this one (ModelGuard) sees any parameter or buffer replaced
        self._probed = _first_tensor(model)
        self.probe = _probe(self._probed)
        self.kwarg_names = list(spec.child(1).context) if spec.num_children == 2 else []
        self.stateful = False  # the inputs hold state objects (a cache) the model updates
        self._walk = None  # a fast flatten of inputs shaped as the example (see pytrees.spec_walker)
        self._states_at: list | None = None  # where the state objects are among the arguments

    @classmethod
    def from_export(cls, unlifted: torch.nn.Module, exported: Any, args: tuple, kwargs: dict,
                    model: torch.nn.Module) -> "InputGuard":  # fmt: skip
        flat, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        placeholders = [n for n in unlifted.graph.nodes if n.op == "placeholder"]
        leaves: list = []
        for value, node in zip(flat, placeholders):
            fake = node.meta.get("val")
            if isinstance(value, torch.Tensor):
                shape = fake.shape if isinstance(fake, torch.Tensor) else value.shape
                dims = tuple(_dim(d) for d in shape)
                if None in dims:  # an expression of symbols: hold it to the example's size
                    dims = tuple(int(s) for s in value.shape)
                leaves.append(_TensorSpec(value.dtype, value.device, dims))
            else:
                leaves.append(value)
        ranges = {
            str(symbol): (float(r.lower), float(r.upper))  # float: int_oo is inf
            for symbol, r in exported.range_constraints.items()
        }
        guard = cls(spec, leaves, ranges, model)
        states = state_objects((args, kwargs))
        guard.stateful = bool(states)
        at = [(None, i) for i, a in enumerate(args) if any(a is x for x in states)]
        at += [(k, None) for k, v in kwargs.items() if any(v is x for x in states)]
        guard._states_at = at if len(at) == len(states) else None  # all arguments themselves
        walk, walked = spec_walker(spec), []
        if walk((tuple(args), dict(kwargs)), walked) and len(walked) == len(flat):
            if all(map(operator.is_, walked, flat)):  # it flattens the example as pytree does
                guard._walk = walk
        return guard

    def accepts(self, args: tuple, kwargs: dict) -> bool:
        """Does a call with these arguments compute what the model computes?"""
        return self.flat_inputs(args, kwargs) is not None

    def flat_inputs(self, args: tuple, kwargs: dict) -> list | None:
        """The inputs flat, in the order of the graph's inputs, if the graph holds for them
        (else ``None``): a caller runs the graph on them without flattening them again."""
        if list(kwargs) != self.kwarg_names and set(kwargs) == set(self.kwarg_names):
            kwargs = {k: kwargs[k] for k in self.kwarg_names}  # keyword order does not matter
        flat: list = []
        # under dynamo the walker's closures would become guards of their own: pytree there
        walk = None if torch.compiler.is_dynamo_compiling() else self._walk
        if walk is None or not walk((tuple(args), dict(kwargs)), flat):
            flat, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
            if spec != self.spec or len(flat) != len(self.leaves):
                return None
        if self.probe is not None and _probe(self._probed) != self.probe:
            return None
        sizes: dict[str, int] = {}
        for value, expected in zip(flat, self.leaves):
            if isinstance(expected, _TensorSpec):
                if not isinstance(value, torch.Tensor) or value.dtype != expected.dtype:
                    return None
                if value.device != expected.device or value.dim() != len(expected.dims):
                    return None
                for size, dim in zip(value.shape, expected.dims):
                    if isinstance(dim, int):
                        if size != dim:
                            return None
                    elif sizes.setdefault(dim, size) != size or not self._in_range(dim, size):
                        return None
            elif isinstance(value, torch.Tensor) or not _same_value(value, expected):
                return None
        return flat

    def states(self, args: tuple, kwargs: dict) -> list:
        """The state objects (caches) of a call this guard accepts, in pytree order."""
        if not self.stateful:
            return []
        if self._states_at is None:
            return state_objects((args, kwargs))
        return [args[i] if k is None else kwargs[k] for k, i in self._states_at]

    def _in_range(self, symbol: str, size: int) -> bool:
        low, high = self.ranges.get(symbol, (0, float("inf")))
        return low <= size <= high


# -- the model ---------------------------------------------------------------------------
# nn.Module's own bookkeeping in every module's __dict__ (hooks, state dicts): never a
# value forward computes with; "training" is guarded for every module on its own
_MODULE_KEYS = frozenset(torch.nn.Module().__dict__)
_TRAINING = operator.itemgetter("training")
_DTYPE = operator.attrgetter("dtype")


def names_read(codes: Iterable[Any]) -> frozenset[str]:
    """Attribute names the model's own code may read: the names its code objects load,
    and string constants (``getattr(self.config, "use_cache")``). ``codes``: the model's
    code objects a trace ran (``TraceResult.codes``, filtered by :class:`~.frames.FrameFilter`).

    Example::

        >>> "output_hidden_states" in names_read(program.codes)
        True
    """
    found: set[str] = set()
    for code in codes:
        found.update(code.co_names)
        found.update(c for c in code.co_consts if type(c) is str and c.isidentifier())
    return frozenset(found)


def _is_plain_object(value: Any) -> bool:
    """A configuration-like object whose fields forward may read (a transformers
    ``PretrainedConfig``, a dataclass of options), not a tensor, module, function or type."""
    return hasattr(value, "__dict__") and not isinstance(
        value, (torch.Tensor, torch.nn.Module, type, types.FunctionType, types.MethodType, types.ModuleType)
    )


class ModelGuard:
    """What a graph assumed about the model, checked on every call in microseconds.

    The graph holds while every module it traced through has the same training flag,
    the same children, parameters, buffers and user hooks (the very objects), and the same value
    in each attribute (and field of a config object) whose name the model's code read
    while tracing; with ``dtypes``, also the dtype of each module's first parameter or
    buffer (a running trace bakes its casts). The attributes of modules under the
    ``eager`` paths are not guarded: they run as they are on every call (their
    structure is: run-time capture holds their modules). :meth:`holds` compares a few lists with
    ``==``, whose items are mostly the very objects seen while tracing (a pointer
    comparison each); only a miss looks for what changed.

    Example::

        >>> guard = ModelGuard(gpt2, read=frozenset({"output_hidden_states"}))
        >>> gpt2.config.output_hidden_states = True
        >>> guard.holds(), guard.changes()
        (False, ['config.output_hidden_states: False -> True'])
    """

    def __init__(self, model: torch.nn.Module, read: frozenset[str], eager: Iterable[str] = (),
                 dtypes: bool = False) -> None:  # fmt: skip
        modules = list(model.named_modules())
        self._paths = [p for p, _ in modules]
        self._dicts = [m.__dict__ for _, m in modules]
        self._flags = list(map(_TRAINING, self._dicts))
        self._holders = [(p, k, d[k]) for p, d in zip(self._paths, self._dicts) for k in _HOLDERS]
        self._live = [h for _, _, h in self._holders]
        self._held = [dict(h) for h in self._live]  # compared with ==: the same objects
        # attributes read while tracing: plain values compared with ==, objects (a
        # config, a list, a tensor, and one-element tensors, whose == is a value) by identity
        plain: list[tuple[str, dict, tuple]] = []
        objects: list[tuple[str, dict, tuple]] = []
        seen: set[int] = set()
        skip = tuple(f"{path}." for path in eager)
        for path, attrs in zip(self._paths, self._dicts):
            if not f"{path}.".startswith(skip):
                self._add_attrs(path, attrs, read, seen, 2, plain, objects)
        for path, _, holder in self._holders:
            small = tuple(k for k, t in holder.items() if isinstance(t, torch.Tensor) and t.numel() <= 1)
            if small:
                objects.append((path, holder, small))
        self._plain, self._objects = _Getters(plain), _Getters(objects)
        self._plain_values = self._plain.values()
        self._object_values = self._objects.values()
        firsts = [next(iter(d["_parameters"].values()), None) for d in self._dicts]
        self._tensors = [t for t in firsts if isinstance(t, torch.Tensor)] if dtypes else []
        self._dtypes = list(map(_DTYPE, self._tensors))

    @staticmethod
    def _add_attrs(name: str, attrs: dict, read: frozenset[str], seen: set[int], depth: int,
                   plain: list, objects: list) -> None:  # fmt: skip
        keys = [k for k in attrs if k in read and k not in _MODULE_KEYS]
        same_value = tuple(k for k in keys if type(attrs[k]) in _PLAIN)
        same_object = tuple(k for k in keys if type(attrs[k]) not in _PLAIN)
        if same_value:
            plain.append((name, attrs, same_value))
        if same_object:
            objects.append((name, attrs, same_object))
        for k in same_object:  # a config object's fields too (and a sub-config's)
            value = attrs[k]
            if depth and _is_plain_object(value) and id(value) not in seen:
                seen.add(id(value))
                ModelGuard._add_attrs(f"{name}.{k}".lstrip("."), vars(value), read, seen, depth - 1,
                                      plain, objects)  # fmt: skip

    def holds(self) -> bool:
        """Is the model as the graph assumed? (a few microseconds when it is)"""
        try:
            if (
                list(map(_TRAINING, self._dicts)) == self._flags
                and self._live == self._held
                and self._plain.values() == self._plain_values
                and all(map(operator.is_, self._objects.values(), self._object_values))
                and list(map(_DTYPE, self._tensors)) == self._dtypes
            ):
                return True
        except Exception:  # a tensor replaced (its == is elementwise), an attribute deleted
            pass
        if self.changes():
            return False
        self._held = [dict(h) for h in self._live]  # hooks of fxcapture or a library came or went
        return True

    def changes(self) -> list[str]:
        """What differs from what the graph assumed, one line per change."""
        found = [
            f"{path or 'the model'}: training={attrs['training']}"
            for path, attrs, flag in zip(self._paths, self._dicts, self._flags)
            if attrs["training"] is not flag
        ]
        for (path, kind, holder), before in zip(self._holders, self._held):
            for key in holder.keys() | before.keys():
                now, was = holder.get(key, _MISSING), before.get(key, _MISSING)
                what = "added" if was is _MISSING else "removed" if now is _MISSING else "replaced"
                if now is was:
                    continue
                if kind in _HOOKS:  # a graph skips hooks of modules it traced through
                    if is_user_hook(now if was is _MISSING else was):
                        found.append(f"{path or 'the model'}: {kind[1:-1].replace('_', ' ')} {what}")
                else:
                    found.append(f"{path}.{key}: {what}".lstrip("."))
        for getters, values, same in ((self._plain, self._plain_values, _equal), (self._objects, self._object_values, operator.is_)):
            for (name, attrs, keys), value in zip(getters.entries, getters.split(values)):
                for key, was in zip(keys, value):
                    now = attrs.get(key, _MISSING)
                    if not same(now, was):
                        found.append(f"{name}.{key}: {was!r} -> {now!r}".lstrip("."))
        if any(t.dtype is not d for t, d in zip(self._tensors, self._dtypes)):
            found.append("dtypes: " + ", ".join(sorted({str(t.dtype) for t in self._tensors})))
        return sorted(set(found), key=found.index)


class _Getters:
    """Reads given keys of several dicts into one flat list (C-level itemgetters)."""

    def __init__(self, entries: list[tuple[str, dict, tuple]]) -> None:
        self.entries = entries
        self._owners = [attrs for _, attrs, _ in entries]
        # itemgetter of one key returns the value, of several a tuple: the first key twice
        self._getters = [operator.itemgetter(*keys, keys[0]) for _, _, keys in entries]

    def values(self) -> list:
        return list(itertools.chain.from_iterable(map(operator.call, self._getters, self._owners)))

    def split(self, flat: list) -> Iterable[list]:
        """``flat`` (from :meth:`values`) back into one list per entry."""
        items = iter(flat)
        for _, _, keys in self.entries:
            yield [next(items) for _ in range(len(keys) + 1)][: len(keys)]


_MISSING = object()
_HOOKS = ("_forward_hooks", "_forward_pre_hooks")
_HOLDERS = ("_modules", "_parameters", "_buffers") + _HOOKS
_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def _equal(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False
