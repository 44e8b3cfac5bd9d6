"""Stage 2: the catalogue of capturable values, one record per value.

Key scheme (documented in the README):

* module output: the module path, ``"layer4"``, ``"blocks.3.attn"``;
* local variable: ``"<module path>:<variable>"``, ``"blocks.3.attn:attn"``; locals
  of the root module's ``forward`` are ``":<variable>"``; locals of a helper
  function belong to the innermost module that called it;
* graph node: ``"%<node name>"``, ``"%add_3"``;
* a module (or a local) that produces k > 1 values in one forward gets keys
  ``"<key>@0"`` ... ``"<key>@<k-1>"`` in execution order.

The same tensor often sits in several frames under one name (transformers keeps
``attn_weights`` in ``eager_attention_forward`` and again in the attention module's
``forward``): such frames are one capture, keyed where the value was created (the
innermost frame); the outer keys remain as aliases.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.fx as fx

from .._util.tree import map_nodes, nodes
from .aliasing import Aliasing, value_at
from .trace import TraceResult

MODULE, LOCAL, NODE = "module", "local", "node"


@dataclass
class NameInfo:
    """One capturable value.

    Attributes:
        key: canonical key, e.g. ``"blocks.3.attn:attn"``.
        kind: ``"module"``, ``"local"`` or ``"node"``.
        module: path of the module that owns it (``""`` for the root).
        op: what produces it (module class, function that held the local, fx op).
        base: the key without its ``@call`` suffix.
        call: index of the call for values produced several times, else ``None``.
        value: the value as a structure of ``fx.Node`` (internal).
    """

    key: str
    kind: str
    module: str
    op: str
    base: str
    call: int | None = None
    value: Any = field(default=None, repr=False, compare=False)
    order: int = field(default=-1, repr=False, compare=False)
    shape: str = field(default="", repr=False, compare=False)

    @property
    def variable(self) -> str | None:
        """The local variable's name for kind ``"local"``."""
        return self.base.rpartition(":")[2] if self.kind == LOCAL else None


class Catalogue:
    """Every capturable value of one traced graph, in execution order."""

    def __init__(self, records: list[NameInfo], aliases: dict[str, str]):
        self.records = records
        self.by_key = {r.key: r for r in records}
        self.aliases = aliases
        self.by_base: dict[str, list[NameInfo]] = defaultdict(list)
        for r in records:
            self.by_base[r.base].append(r)

    def __iter__(self) -> Iterator[NameInfo]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)


def _keyed(base: str, values: list[Any]) -> list[tuple[str, int | None, Any]]:
    if len(values) == 1:
        return [(base, None, values[0])]
    return [(f"{base}@{i}", i, v) for i, v in enumerate(values)]


def build_catalogue(result: TraceResult, root: torch.nn.Module) -> Catalogue:
    """Turn what the tracer saw into keyed :class:`NameInfo` records."""
    order = {node: i for i, node in enumerate(result.graph.nodes)}
    modules = dict(root.named_modules())

    def position(value: Any) -> int:
        return max((order.get(n, -1) for n in nodes(value)), default=-1)

    records: list[NameInfo] = []

    calls: dict[str, list[Any]] = defaultdict(list)
    for path, value in result.module_calls:
        calls[path].append(value)
    for path, values in calls.items():
        op = type(modules[path]).__name__ if path in modules else "Module"
        for key, call, value in _keyed(path, values):
            records.append(NameInfo(key, MODULE, path, op, path, call, value))

    # Locals: one value per distinct (module, name, nodes); the same nodes under the
    # same name in an outer frame become an alias of the innermost one.
    local_values: dict[str, list[Any]] = defaultdict(list)
    local_function: dict[str, list[str]] = defaultdict(list)  # per value: a helper's
    # locals share their base key with the calling forward's (`x` in both)
    first_seen: dict[tuple, str] = {}  # (name, node ids) -> base key where created
    alias_bases: dict[str, str] = {}
    aliasing = Aliasing(result.graph, modules)
    for rec in result.locals:
        base = f"{rec.module}:{rec.name}"
        if rec.returned_after is not None:  # in-place writes before the return count
            rec.value = map_nodes(lambda v: value_at(v, rec.returned_after, aliasing), rec.value)
        identity = (rec.name, tuple(id(n) for n in nodes(rec.value)))
        origin = first_seen.get(identity)
        if origin is not None:
            if origin != base:
                alias_bases.setdefault(base, origin)
            continue
        first_seen[identity] = base
        local_values[base].append(rec.value)
        local_function[base].append(rec.function)
    for base, values in local_values.items():
        module = base.rpartition(":")[0]
        for (key, call, value), function in zip(_keyed(base, values), local_function[base]):
            records.append(NameInfo(key, LOCAL, module, function, base, call, value))

    order = {node: i for i, node in enumerate(result.graph.nodes)}  # with value_at's reads
    for node in result.graph.nodes:
        if node.op == "output" or node.meta.get("fxcapture_read"):
            continue
        target = node.target if isinstance(node.target, str) else getattr(
            node.target, "__name__", str(node.target)
        )
        op = f"{node.op} {target}"
        module = node.meta.get("fxcapture_module", "")
        records.append(NameInfo(f"%{node.name}", NODE, module, op, f"%{node.name}", None, node))

    for r in records:
        r.order = position(r.value)
    kind_rank = {LOCAL: 0, MODULE: 1, NODE: 2}
    records.sort(key=lambda r: (r.order, kind_rank[r.kind]))

    aliases: dict[str, str] = {}
    for alias_base, origin in alias_bases.items():
        if alias_base in local_values:
            continue  # the outer frame also has values of its own under that key
        aliases[alias_base] = origin
    return Catalogue(records, aliases)


def nested(catalogue: Catalogue, path: str) -> Catalogue:
    """A submodule's own names as the whole model names them; graph nodes are left out.

    Example::

        >>> nested(build_catalogue(tracer.trace_model(blocks), blocks), "blocks").records[0].key
        'blocks.0'
    """

    def at(module: str) -> str:
        return f"{path}.{module}" if module else path

    records = []
    for r in catalogue:
        if r.kind == NODE:
            continue
        base = at(r.base) if r.kind == MODULE else f"{at(r.module)}:{r.variable}"
        records.append(NameInfo(base + r.key[len(r.base):], r.kind, at(r.module), r.op, base, r.call))
    aliases = {f"{at(a.partition(':')[0])}:{a.partition(':')[2]}": f"{at(o.partition(':')[0])}:{o.partition(':')[2]}"
               for a, o in catalogue.aliases.items()}  # fmt: skip
    return Catalogue(records, aliases)
