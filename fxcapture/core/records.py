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
from typing import Any, Callable, Iterable, Iterator

import torch

from .._util.tree import map_nodes, nodes
from .aliasing import Aliasing, value_after_writes, value_at
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
    """Every capturable value of one traced graph, in execution order.

    ``unselected``: the bases (``"module:variable"``) of locals a tracer saw but kept out
    of its graph, because no selector could select them; listed for error messages only.
    """

    def __init__(self, records: list[NameInfo], aliases: dict[str, str], unselected: Iterable[str] = ()):
        self.records = records
        self.by_key = {r.key: r for r in records}
        self.aliases = aliases
        self.unselected = frozenset(unselected)
        self.by_base: dict[str, list[NameInfo]] = defaultdict(list)
        for r in records:
            self.by_base[r.base].append(r)

    def __iter__(self) -> Iterator[NameInfo]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)


@dataclass
class Observation:
    """What a tracer saw: a module's return value, or a function's local when it returned.

    Every tracer observes the same way (the graph tracers at trace time, run-time capture
    per call) and :func:`key_observations` keys them all.

    Attributes:
        kind: ``"module"`` or ``"local"``.
        module: path of the module that owns it (``""`` for the root).
        op: the module's class, or the qualified name of the function that held the local.
        name: the local variable (``""`` for a module output).
        value: the value as ``fx.Node`` (graph tracers) or tensors (run time).
        position: where it comes in execution order (graph node index, run-time clock).
    """

    kind: str
    module: str
    op: str
    name: str
    value: Any = field(repr=False)
    position: int = -1

    @property
    def base(self) -> str:
        return self.module if self.kind == MODULE else f"{self.module}:{self.name}"


def key_observations(
    observations: list[Observation], parts: Callable[[Any], list[Any]]
) -> tuple[list[NameInfo], dict[str, str]]:
    """Records and aliases of observations, in execution order: the one keying.

    A base observed k > 1 times gets ``base@0`` ... ``base@k-1``. A local holding the
    same values (``parts``: its graph nodes, or its tensors) under the same name as one
    observed before (an inner frame returns first) is that capture: its base becomes an
    alias, unless it has values of its own.

    Example::

        >>> records, aliases = key_observations(observations, nodes)
        >>> [r.key for r in records][:2]
        ['blocks.0.attn:attn', 'blocks.0.attn']
    """
    by_base: dict[str, list[Observation]] = defaultdict(list)
    first_seen: dict[tuple, str] = {}  # (name, ids of its parts) -> base where created
    alias_bases: dict[str, str] = {}
    kept: list[Observation] = []
    for obs in observations:
        if obs.kind == LOCAL:
            identity = (obs.name, tuple(id(p) for p in parts(obs.value)))
            origin = first_seen.get(identity)
            if origin is not None:  # the same value, keyed where it was created
                if origin != obs.base:
                    alias_bases.setdefault(obs.base, origin)
                continue
            first_seen[identity] = obs.base
        by_base[obs.base].append(obs)
        kept.append(obs)
    records, calls = [], defaultdict(int)
    for obs in kept:  # in observation order: values of one op stay in the order seen
        i, n = calls[obs.base], len(by_base[obs.base])
        calls[obs.base] += 1
        key, call = (obs.base, None) if n == 1 else (f"{obs.base}@{i}", i)
        records.append(NameInfo(key, obs.kind, obs.module, obs.op, obs.base, call, obs.value, obs.position))
    records.sort(key=execution_order)
    aliases = {alias: origin for alias, origin in alias_bases.items() if alias not in by_base}
    return records, aliases


_KIND_RANK = {LOCAL: 0, MODULE: 1, NODE: 2}


def execution_order(record: NameInfo) -> tuple:
    """Sort key of records in execution order. Values made by the same op come inner
    frame first: a module's own locals, then its output, then the locals of the modules
    that called it (which see the output only once it returned); graph nodes last."""
    depth = record.module.count(".") + 1 if record.module else 0
    return record.order, record.kind == NODE, -depth, _KIND_RANK[record.kind]


def build_catalogue(result: TraceResult, root: torch.nn.Module) -> Catalogue:
    """Turn what a graph tracer saw into keyed :class:`NameInfo` records, graph nodes last
    among values made by the same op."""
    modules = dict(root.named_modules())
    aliasing = Aliasing(result.graph, modules)
    observations = [
        Observation(MODULE, path, type(modules[path]).__name__ if path in modules else "Module", "", value)
        for path, value in result.module_calls
    ]
    for rec in result.locals:
        if rec.returned_after is not None:  # in-place writes before the return count
            rec.value = map_nodes(lambda v: value_at(v, rec.returned_after, aliasing), rec.value)
    order = {node: i for i, node in enumerate(result.graph.nodes)}  # with value_at's reads
    for obs in observations:
        obs.position = _position(obs.value, order)
    for rec in result.locals:  # a local sorts where the last op writing it ran, as run time orders it
        observations.append(Observation(LOCAL, rec.module, rec.function, rec.name, rec.value,
                                        _position(rec.value, order)))
    records, aliases = key_observations(observations, nodes)
    for node in result.graph.nodes:
        if node.op == "output" or node.meta.get("fxcapture_read"):
            continue
        target = node.target if isinstance(node.target, str) else getattr(
            node.target, "__name__", str(node.target)
        )
        module = node.meta.get("fxcapture_module", "")
        records.append(NameInfo(f"%{node.name}", NODE, module, f"{node.op} {target}", f"%{node.name}",
                                None, node, order[node]))  # fmt: skip
    records.sort(key=execution_order)
    return Catalogue(records, aliases, result.unselected)


def _position(value: Any, order: dict) -> int:
    """The latest op that made or wrote ``value``: a read after writes stands at the write."""
    return max((order.get(n.args[1] if n.target is value_after_writes else n, -1) for n in nodes(value)),
               default=-1)  # fmt: skip


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
