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

from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree  # export's input structures (torch 2.14)

from .pytrees import state_objects


@dataclass(frozen=True)
class _TensorSpec:
    dtype: torch.dtype
    device: torch.device
    dims: tuple  # an int (static) or a symbol name (dynamic) per dimension


def _probe(model: torch.nn.Module) -> tuple | None:
    """dtype and device of the model's first tensor: a graph bakes them in casts."""
    for t in model.parameters():
        return (t.dtype, t.device)
    for t in model.buffers():
        return (t.dtype, t.device)
    return None


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

    def __init__(self, spec: Any, leaves: list, ranges: dict[str, tuple], probe: tuple | None,
                 model: torch.nn.Module) -> None:  # fmt: skip
        self.spec = spec
        self.leaves = leaves
        self.ranges = ranges
        self.probe = probe
        self._model = model
        self.kwarg_names = list(spec.child(1).context) if spec.num_children == 2 else []
        self.stateful = False  # the inputs hold state objects (a cache) the model updates

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
        guard = cls(spec, leaves, ranges, _probe(model), model)
        guard.stateful = bool(state_objects((args, kwargs)))
        return guard

    def accepts(self, args: tuple, kwargs: dict) -> bool:
        """Does a call with these arguments compute what the model computes?"""
        if list(kwargs) != self.kwarg_names and set(kwargs) == set(self.kwarg_names):
            kwargs = {k: kwargs[k] for k in self.kwarg_names}  # keyword order does not matter
        flat, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        if spec != self.spec or len(flat) != len(self.leaves):
            return False
        if self.probe is not None and _probe(self._model) != self.probe:
            return False
        sizes: dict[str, int] = {}
        for value, expected in zip(flat, self.leaves):
            if isinstance(expected, _TensorSpec):
                if not isinstance(value, torch.Tensor) or value.dtype != expected.dtype:
                    return False
                if value.device != expected.device or value.dim() != len(expected.dims):
                    return False
                for size, dim in zip(value.shape, expected.dims):
                    if isinstance(dim, int):
                        if size != dim:
                            return False
                    elif sizes.setdefault(dim, size) != size or not self._in_range(dim, size):
                        return False
            elif isinstance(value, torch.Tensor) or not _same_value(value, expected):
                return False
        return True

    def _in_range(self, symbol: str, size: int) -> bool:
        low, high = self.ranges.get(symbol, (0, float("inf")))
        return low <= size <= high
