"""The traced graph as a ``networkx.DiGraph``: inspect it, export it, draw it.

:func:`to_networkx` gives one graph node per fx node (keyed by the fx node name) and
one edge per fx ``users`` entry. Node attributes:

* ``op``, ``target``: the fx op and its target (``call_module layer1.0.conv1``);
* ``module``: path of the innermost module the op ran in (``""`` for the root);
* ``locals``: the local-variable keys that name this value (``"blocks.0.attn:attn"``),
  ``module_output``: the module keys whose return value it is, comma-separated;
* ``shape``, ``dtype``: when example inputs are given (``ShapeProp`` on a copy);
* ``captured``: whether the extractor (or ``names=``) selects it.

:func:`module_view` collapses it to one node per called module (optionally cut at a
depth), edges following the data flow. ``nx.write_graphml`` works on both (every
attribute is a string, an int or a bool). :func:`fxcapture.inspect.draw.draw` renders either, captured
values highlighted; ``fxcapture graph MODEL --names ... --out g.svg`` does it all.

Example::

    >>> g = to_networkx(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224), names=["layer4"])
    >>> g.nodes["layer4_1_relu_1"]["shape"], g.nodes["layer4_1_relu_1"]["captured"]
    ('(1, 512, 7, 7)', True)
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any, Iterable

import networkx as nx
import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from .._util.tree import nodes
from ..core.build import choose_trace
from ..core.extractor import Extractor
from ..core.records import LOCAL, MODULE, Catalogue
from ..core.select import resolve
from ..core.spec import CaptureSpec


# -- building ---------------------------------------------------------------------------
def _traced(model: torch.nn.Module, names: Any, leaf_modules: Iterable[Any], attention: str | None = None,
            example: tuple | None = None):  # fmt: skip
    """(graph, catalogue, captured nodes, what the graph's attributes are read from) of a
    model (traced with the tracer :func:`fxcapture.capture` would use) or an extractor."""
    if isinstance(model, Extractor):
        program = model._current()
        if program is None:
            raise ValueError(
                "this extractor traces its model by running it on the first call: call it once "
                "(or build it with capture(..., example_inputs=...)), then ask for its graph"
            )
        if program.graph is None:
            raise ValueError(
                "this extractor runs its model eagerly (no tracer follows it), so it has no graph; "
                f"untraced: {model.untraced}"
            )
        return program.graph, program.catalogue, _captured_as(program.features), program.module
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"to_networkx needs an nn.Module or an Extractor, got {type(model).__name__}")
    spec = CaptureSpec(names or (), leaf_modules=leaf_modules, attention=attention)
    trace = choose_trace(model, spec.replace(names=()), (example, {}) if example is not None else None,
                         listing=True)
    if trace is None or trace.result is None:
        why = trace.untraced.get("") if trace is not None else "torch.fx cannot trace it exactly"
        raise ValueError(
            f"no graph to show ({why}): pass example_inputs= to trace it by running it"
        )
    result, catalogue = trace.result, trace.catalogue
    captured: dict[fx.Node, list[str]] = {}
    if names:
        captured = _captured_as(resolve(catalogue, names, model, result.leaf_paths))
    root = result.root if result.root is not None else model
    return result.graph, catalogue, captured, _AttrSource(root, result.constants)


def _captured_as(features: dict[str, Any]) -> dict[fx.Node, list[str]]:
    """{node: the feature keys (as selected: ``layer4``, ``blocks.3.attn:attn``) it holds}."""
    found: dict[fx.Node, list[str]] = defaultdict(list)
    for key, info in features.items():
        for node in nodes(info.value):
            found[node].append(key)
    return found


class _AttrSource:
    """Looks up ``get_attr``/``call_module`` targets on the model, then among fx constants."""

    def __init__(self, model: torch.nn.Module, constants: dict[str, torch.Tensor]) -> None:
        self.model, self.constants = model, constants

    def fetch(self, target: str) -> Any:
        if target in self.constants:
            return self.constants[target]
        value: Any = self.model
        for part in target.split("."):
            value = getattr(value, part)
        return value


def _fetch(source: Any, target: str) -> Any:
    if isinstance(source, _AttrSource):
        return source.fetch(target)
    value = source
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _shapes(graph: fx.Graph, source: Any, example_inputs: tuple) -> dict[fx.Node, tuple[str, str]]:
    """{node: (shape, dtype)} by running a copy of ``graph`` on the example inputs."""
    copy = fx.Graph()
    mapping: dict[fx.Node, fx.Node] = {}
    copy.output(copy.graph_copy(graph, mapping))
    attrs = {n.target: _fetch(source, n.target) for n in copy.nodes if n.op in ("get_attr", "call_module")}
    module = fx.GraphModule(attrs, copy)
    try:
        with torch.no_grad():
            ShapeProp(module).propagate(*example_inputs)
    except Exception as err:  # a shape is a nicety: never fail the graph for it
        warnings.warn(f"fxcapture.inspect.graph.to_networkx: no shapes ({type(err).__name__}: {err})", stacklevel=3)
        return {}
    found = {}
    for original, node in mapping.items():
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            found[original] = (str(tuple(meta.shape)), str(meta.dtype).replace("torch.", ""))
    return found


def _names_of(catalogue: Catalogue) -> tuple[dict[fx.Node, list[str]], dict[fx.Node, list[str]]]:
    """{node: local keys whose value is exactly it}, {node: module keys whose value it is}."""
    local_keys: dict[fx.Node, list[str]] = defaultdict(list)
    module_keys: dict[fx.Node, list[str]] = defaultdict(list)
    for info in catalogue:
        if info.kind in (LOCAL, MODULE) and isinstance(info.value, fx.Node):
            (local_keys if info.kind == LOCAL else module_keys)[info.value].append(info.key)
    return local_keys, module_keys


def _target(node: fx.Node) -> str:
    if isinstance(node.target, str):
        return node.target
    return getattr(node.target, "__name__", str(node.target))


def to_networkx(
    model_or_extractor: torch.nn.Module,
    example_inputs: Any = None,
    *,
    names: Any = None,
    leaf_modules: Iterable[Any] = (),
    attention: str | None = None,
) -> nx.DiGraph:
    """The fx graph as a ``networkx.DiGraph``, one node per fx node, edges = fx ``users``.

    Args:
        model_or_extractor: a model (traced here) or an :class:`~fxcapture.Extractor`
            (its current graph; captured values are the extractor's).
        example_inputs: a tensor or a tuple of positional inputs: adds ``shape`` and
            ``dtype`` attributes.
        names: selectors to mark as ``captured`` when a model is given.
        leaf_modules, attention: as for :func:`fxcapture.capture` (``names`` asking for
            ``attn_probs`` imply ``attention="weights"``).

    Example::

        >>> g = to_networkx(model, torch.randn(1, 3, 224, 224), names="layer4")
        >>> [n for n, d in g.nodes(data=True) if d["captured"]]
        ['layer4_1_relu_1']
    """
    inputs = None
    if example_inputs is not None:
        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    graph, catalogue, captured, source = _traced(model_or_extractor, names, leaf_modules, attention, inputs)
    shapes = {}
    if inputs is not None:
        shapes = _shapes(graph, source, inputs)
    local_keys, module_keys = _names_of(catalogue)
    g = nx.DiGraph(name=type(getattr(model_or_extractor, "_model", model_or_extractor)).__name__)
    for order, node in enumerate(graph.nodes):
        shape, dtype = shapes.get(node, ("", ""))
        g.add_node(
            node.name, op=node.op, target=_target(node), order=order,
            module=node.meta.get("fxcapture_module", ""),
            locals=", ".join(local_keys.get(node, [])),
            module_output=", ".join(module_keys.get(node, [])),
            shape=shape, dtype=dtype, captured=node in captured,
            captured_as=", ".join(captured.get(node, [])),
        )  # fmt: skip
    for node in graph.nodes:
        for user in node.users:
            g.add_edge(node.name, user.name)
    g.graph["called_modules"] = ",".join(
        dict.fromkeys(info.module for info in catalogue if info.kind == MODULE)
    )
    return g


def _truncate(path: str, depth: int | None) -> str:
    if depth is None or not path:
        return path
    return ".".join(path.split(".")[:depth])


def module_view(g: nx.DiGraph, depth: int | None = None) -> nx.DiGraph:
    """One node per module call (module paths cut at ``depth`` components), edges = data flow.

    Node ``kind`` is ``"module"`` for a module call, ``"input"`` for a graph input,
    ``"output"`` for the output and ``"op"`` for an op of the root ``forward`` that
    runs outside every submodule (kept as its own node, ``"%flatten"``). A module
    called twice is two nodes, keyed as :func:`fxcapture.capture` keys its calls
    (``layer1.0.relu@0``, ``layer1.0.relu@1``), so the view is acyclic and reads along
    the data flow. Attributes: ``module`` (the path), ``ops`` (fx nodes held),
    ``targets`` (what the module's own ops call, e.g. ``iadd`` for a residual
    block's sum), ``captured`` (any op is), ``shape`` (of the call's return value
    when known), ``order`` (first op).

    Example::

        >>> view = module_view(to_networkx(resnet18), depth=1)
        >>> list(view)[:4]
        ['x', 'conv1', 'bn1', 'relu']
        >>> [n for n in module_view(to_networkx(resnet18)) if n.startswith("layer1.0.relu")]
        ['layer1.0.relu@0', 'layer1.0.relu@1']
    """
    called = [p for p in g.graph.get("called_modules", "").split(",") if p]
    modules = {_truncate(path, depth) for path in called}
    hidden = leftovers(g)
    ordered = [(n, d) for n, d in sorted(g.nodes(data=True), key=lambda item: item[1]["order"]) if n not in hidden]
    calls = _calls(g, modules, depth)
    owner = _runs(g, [n for n, _ in ordered], calls)
    view = nx.DiGraph(name=g.graph.get("name", ""))
    deeper: set[str] = set()  # nodes holding ops of submodules: their own ops do not name them
    for name, data in ordered:
        key = owner[name]
        _, kind, module = calls[name]
        if key not in view:
            view.add_node(key, kind=kind, module=module, ops=0, targets="", captured=False, shape="",
                          order=data["order"], captured_as="")  # fmt: skip
        attrs = view.nodes[key]
        attrs["ops"] += 1
        attrs["captured"] = attrs["captured"] or data["captured"]
        if data.get("captured_as"):
            attrs["captured_as"] = ", ".join(filter(None, [attrs["captured_as"], data["captured_as"]]))
        if kind == "module" and data["module"] != module and data["op"] != "get_attr":
            deeper.add(key)
        elif kind == "module" and data["op"] not in ("call_module", "get_attr"):
            attrs["targets"] = ", ".join(dict.fromkeys(filter(None, [*attrs["targets"].split(", "), data["target"]])))
        if kind != "module":
            attrs["shape"] = data["shape"]
        for output_key in filter(None, data["module_output"].split(", ")):
            if output_key.partition("@")[0] == module and not attrs["shape"]:
                attrs["shape"] = data["shape"]
    for key in deeper:
        view.nodes[key]["targets"] = ""
    for u, v in g.edges:
        if u in owner and v in owner and owner[u] != owner[v]:
            view.add_edge(owner[u], owner[v])
    # Containers that own no op themselves (a Sequential) are nodes too, without edges.
    for path in sorted(modules - {d["module"] for _, d in view.nodes(data=True)},
                       key=called.index if depth is None else len):  # fmt: skip
        view.add_node(path, kind="module", module=path, ops=0, targets="", captured=False, shape="",
                      order=-1, captured_as="")  # fmt: skip
    return view


def _runs(g: nx.DiGraph, ordered: list[str], calls: dict[str, tuple[str, str, str]]) -> dict[str, str]:
    """{fx node: view node}. A call's ops make one view node, unless the data flows out
    of them and back in through others (a block's residual sums around its MLP): then
    each run of its ops between such detours is a node of its own (``blocks.0`` and
    ``blocks.0:%add_1``), which keeps the view acyclic."""
    runs: list[list[str]] = []
    for name in ordered:  # maximal runs of consecutive ops of one call
        if runs and calls[runs[-1][0]][0] == calls[name][0]:
            runs[-1].append(name)
        else:
            runs.append([name])
    run_of = {name: i for i, run in enumerate(runs) for name in run}
    flow = nx.DiGraph()
    flow.add_nodes_from(range(len(runs)))
    flow.add_edges_from((run_of[u], run_of[v]) for u, v in g.edges
                        if u in run_of and v in run_of and run_of[u] != run_of[v])  # fmt: skip
    group: dict[str, int] = {}  # call -> the run its next runs merge into
    first: dict[str, int] = {}  # call -> its first run, which the call's key names
    merged = list(range(len(runs)))
    for i, run in enumerate(runs):  # runs are in execution order: data only flows forward
        key = calls[run[0]][0]
        first.setdefault(key, i)
        if key in group and not _detour(flow, group[key], i):
            flow = nx.contracted_nodes(flow, group[key], i, self_loops=False)
            merged[i] = group[key]
        else:
            group[key] = i
    names = {}
    for i, head in enumerate(merged):
        key = calls[runs[head][0]][0]
        names[i] = key if head == first[key] else f"{key}:%{runs[head][0]}"
    return {name: names[run_of[name]] for name in ordered}


def _detour(flow: nx.DiGraph, a: int, b: int) -> bool:
    """Whether data flows from run ``a`` to run ``b`` through other runs."""
    return any(nx.has_path(flow, s, b) for s in flow.successors(a) if s != b)


def _calls(g: nx.DiGraph, modules: set[str], depth: int | None) -> dict[str, tuple[str, str, str]]:
    """{fx node: (view key, kind, module path)}. A call of a module ends at the op that
    its key (``path`` or ``path@i``) names as its return value; the next op in that
    module starts its next call. A parameter read outside every module goes with the
    one call that uses it."""
    returns: dict[str, set[int]] = defaultdict(set)  # module -> the call indices it returns
    for _, data in g.nodes(data=True):
        for key in filter(None, data["module_output"].split(", ")):
            path, _, index = key.partition("@")
            returns[path].add(int(index or 0))
    current: dict[str, int] = defaultdict(int)
    found = {}
    for name, data in sorted(g.nodes(data=True), key=lambda item: item[1]["order"]):
        key, kind = _owner(name, data, modules, depth)
        module = key if kind == "module" else ""
        if module and len(returns[module]) > 1:
            key = f"{module}@{current[module]}"
        found[name] = (key, kind, module)
        for output in filter(None, data["module_output"].split(", ")):
            path = output.partition("@")[0]
            if _truncate(path, depth) == path:
                current[path] += 1
    for name, data in g.nodes(data=True):  # a parameter read at the root (torch.export's
        users = {found[user] for user in g.successors(name)}  # get_attr) goes with its user
        if data["op"] == "get_attr" and found[name][1] == "op" and len(users) == 1:
            found[name] = users.pop()
    return found


# ops that read a tensor's size: sizes, not data (drawn, a dynamic batch size read
# once ties the input to every reshape of the model)
SIZE_READS = frozenset({"size", "sym_size", "sym_size.int", "sym_numel", "sym_numel.default"})


def leftovers(g: nx.DiGraph) -> set[str]:
    """Trace leftovers a drawing hides, unless captured: ``_assert*`` checks of constant
    arguments, reads of a tensor's size (:data:`SIZE_READS`) and values nothing else
    uses (unused constants, dead ``size`` calls).

    Example::

        >>> "_assert_is_none" in leftovers(to_networkx(model))
        True
    """
    hidden: set[str] = set()
    for name, data in sorted(g.nodes(data=True), key=lambda item: -item[1]["order"]):  # users first
        if data["captured"] or data["op"] in ("placeholder", "output"):
            continue
        target = str(data.get("target", ""))
        is_assert = target.lstrip("_").startswith("assert")
        if is_assert or target in SIZE_READS or all(user in hidden for user in g.successors(name)):
            hidden.add(name)
    return hidden


def _owner(name: str, data: dict, modules: set[str], depth: int | None) -> tuple[str, str]:
    """The view node (and its kind) of one fx node: its module or nearest called ancestor."""
    if data["op"] == "placeholder":
        return name, "input"
    if data["op"] == "output":
        return "(output)", "output"
    path = _truncate(data["module"], depth)
    while path and path not in modules:
        path = path.rpartition(".")[0]
    return (path, "module") if path else (f"%{name}", "op")


# -- drawing ----------------------------------------------------------------------------
__all__ = ["SIZE_READS", "leftovers", "module_view", "to_networkx"]
