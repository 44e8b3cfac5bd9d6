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
attribute is a string, an int or a bool). :func:`draw` renders either, captured
values highlighted; ``fxcapture graph MODEL --names ... --out g.svg`` does it all.

Example::

    >>> g = to_networkx(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224), names=["layer4"])
    >>> g.nodes["layer4_1_relu_1"]["shape"], g.nodes["layer4_1_relu_1"]["captured"]
    ('(1, 512, 7, 7)', True)
"""

from __future__ import annotations

import argparse
import warnings
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import networkx as nx
import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from .catalogue import LOCAL, MODULE, Catalogue, value_nodes

if TYPE_CHECKING:
    from matplotlib.figure import Figure


# -- building ---------------------------------------------------------------------------
def _traced(model: torch.nn.Module, names: Any, leaf_modules: Iterable[Any]):
    """(graph, catalogue, captured nodes, constants) of a model or an extractor."""
    from .extractor import Extractor, make_spec, trace_with_fallback
    from .resolve import resolve

    if isinstance(model, Extractor):
        if model.graph is None:
            raise ValueError(
                "this extractor runs its model eagerly (fx could not trace it), so it has no graph; "
                f"untraced: {model.untraced}"
            )
        program = model._program
        captured = {n for info in program.features.values() for n in value_nodes(info.value)}
        return program.graph, program.catalogue, captured, model
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"to_networkx needs an nn.Module or an Extractor, got {type(model).__name__}")
    result, catalogue, untraced = trace_with_fallback(model, make_spec((), leaf_modules))
    if result is None:
        raise ValueError(
            f"torch.fx cannot trace this model ({untraced.get('')}); there is no graph to show"
        )
    captured: set[fx.Node] = set()
    if names:
        features = resolve(catalogue, names, model, result.leaf_paths)
        captured = {n for info in features.values() for n in value_nodes(info.value)}
    return result.graph, catalogue, captured, _AttrSource(model, result.constants)


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
        warnings.warn(f"fxcapture.to_networkx: no shapes ({type(err).__name__}: {err})", stacklevel=3)
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
) -> nx.DiGraph:
    """The fx graph as a ``networkx.DiGraph``, one node per fx node, edges = fx ``users``.

    Args:
        model_or_extractor: a model (traced here) or an :class:`~fxcapture.Extractor`
            (its current graph; captured values are the extractor's).
        example_inputs: a tensor or a tuple of positional inputs: adds ``shape`` and
            ``dtype`` attributes.
        names: selectors to mark as ``captured`` when a model is given.
        leaf_modules: as for :func:`fxcapture.capture`.

    Example::

        >>> g = to_networkx(model, torch.randn(1, 3, 224, 224), names="layer4")
        >>> [n for n, d in g.nodes(data=True) if d["captured"]]
        ['layer4_1_relu_1']
    """
    graph, catalogue, captured, source = _traced(model_or_extractor, names, leaf_modules)
    shapes = {}
    if example_inputs is not None:
        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
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
    """One node per called module (cut at ``depth`` path components), edges = data flow.

    Node ``kind`` is ``"module"`` for a called module, ``"input"`` for a graph input,
    ``"output"`` for the output and ``"op"`` for an op of the root ``forward`` that
    runs outside every submodule (kept as its own node, ``"%flatten"``). Attributes:
    ``ops`` (fx nodes held), ``captured`` (any of them is), ``shape`` (of the module's
    return value when known), ``order`` (first op). A module called twice is one
    node, so the view can have cycles.

    Example::

        >>> view = module_view(to_networkx(resnet18), depth=1)
        >>> list(view)[:4]
        ['x', 'conv1', 'bn1', 'relu']
    """
    called = [p for p in g.graph.get("called_modules", "").split(",") if p]
    modules = {_truncate(path, depth) for path in called}
    view = nx.DiGraph(name=g.graph.get("name", ""))
    owner: dict[str, str] = {}
    for name, data in sorted(g.nodes(data=True), key=lambda item: item[1]["order"]):
        key, kind = _owner(name, data, modules, depth)
        owner[name] = key
        if key not in view:
            view.add_node(key, kind=kind, ops=0, captured=False, shape="", order=data["order"])
        attrs = view.nodes[key]
        attrs["ops"] += 1
        attrs["captured"] = attrs["captured"] or data["captured"]
        if kind != "module":
            attrs["shape"] = data["shape"]
        for output_key in filter(None, data["module_output"].split(", ")):
            if output_key.partition("@")[0] == key and not attrs["shape"]:
                attrs["shape"] = data["shape"]
    for u, v in g.edges:
        if owner[u] != owner[v]:
            view.add_edge(owner[u], owner[v])
    # Containers that own no op themselves (a Sequential) are nodes too, without edges.
    for path in sorted(modules - set(view), key=called.index if depth is None else len):
        view.add_node(path, kind="module", ops=0, captured=False, shape="", order=-1)
    return view


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
def _layers(g: nx.DiGraph) -> dict[Any, int]:
    """Longest-path depth of every node from the inputs, along edges that go forward in
    execution order (a module called twice makes cycles in the module view)."""
    order = {n: d.get("order", i) for i, (n, d) in enumerate(g.nodes(data=True))}
    depth: dict[Any, int] = {}
    for node in sorted(g, key=order.__getitem__):
        earlier = [p for p in g.predecessors(node) if order[p] < order[node]]
        depth[node] = max((depth[p] + 1 for p in earlier), default=0)
    return depth


def _label(node: str, data: dict, module_level: bool) -> str:
    if module_level:
        name = node if node.count(".") < 3 else "..." + ".".join(node.split(".")[-2:])
        return f"{name}\n{data['shape']}" if data.get("shape") else name
    name = data.get("locals") or data.get("module_output") or node
    name = name.split(", ")[0]
    return f"{name}\n{data['shape']}" if data.get("shape") else name


def draw(
    g: nx.DiGraph,
    *,
    title: str | None = None,
    max_nodes: int = 400,
    dpi: int = 100,
    save: str | Path | None = None,
) -> "Figure":
    """Draw a graph from :func:`to_networkx` or :func:`module_view`, top to bottom.

    Captured nodes are red with their names; the others are small grey dots (a label
    on every op of a big graph is unreadable: use :func:`module_view` for an overview).

    Example::

        >>> draw(module_view(to_networkx(model, names="layer4"), depth=2), save="g.svg")
    """
    from .viz import _figure, _save

    if g.number_of_nodes() > max_nodes:
        raise ValueError(
            f"{g.number_of_nodes()} nodes is too many to draw legibly (max_nodes={max_nodes}); "
            "draw module_view(graph, depth=...) instead (fxcapture graph --view module --depth N)"
        )
    module_level = "ops" in next(iter(g.nodes.values()), {})  # a module_view
    if module_level:  # containers without ops of their own add nothing to the picture
        g = g.subgraph([n for n, d in g.nodes(data=True) if d["ops"] or g.degree(n)])
    depth = _layers(g)
    for node, d in depth.items():
        g.nodes[node]["_layer"] = d
    pos = nx.multipartite_layout(g, subset_key="_layer", align="horizontal", scale=1.0)
    for node in g:
        del g.nodes[node]["_layer"]
    pos = {n: (x, -y) for n, (x, y) in pos.items()}  # inputs at the top
    n_layers = max(depth.values(), default=0) + 1
    widest = max(sum(1 for d in depth.values() if d == k) for k in range(n_layers)) if depth else 1
    fig = _figure(figsize=(min(4 + 1.6 * widest, 30), min(2 + 0.45 * n_layers, 120)), dpi=dpi)
    ax = fig.subplots()
    captured = [n for n, d in g.nodes(data=True) if d.get("captured")]
    others = [n for n in g if n not in set(captured)]
    nx.draw_networkx_edges(g, pos, ax=ax, edge_color="#9a9a9a", arrows=True, arrowsize=6, width=0.7,
                           node_size=60)  # fmt: skip
    plain_size = 260 if module_level else 25
    nx.draw_networkx_nodes(g, pos, nodelist=others, ax=ax, node_color="#a6c8e0", node_size=plain_size,
                           edgecolors="#4a6f8a", linewidths=0.5)  # fmt: skip
    nx.draw_networkx_nodes(g, pos, nodelist=captured, ax=ax, node_color="#e0413a", node_size=120,
                           edgecolors="black", linewidths=1.0)  # fmt: skip
    labelled = g.nodes if module_level or len(g) <= 150 else captured
    labels = {n: _label(n, g.nodes[n], module_level) for n in labelled}
    xs = [x for x, _ in pos.values()]
    span = (max(xs) - min(xs)) or 1.0
    label_pos = {n: (x + 0.025 * span, y) for n, (x, y) in pos.items()}  # beside the marker
    ax.set_xlim(min(xs) - 0.1 * span, max(xs) + 0.4 * span)  # room for the labels
    nx.draw_networkx_labels(g, label_pos, labels=labels, ax=ax, font_size=7,
                            horizontalalignment="left", verticalalignment="center")  # fmt: skip
    from matplotlib.lines import Line2D

    ax.legend(handles=[
        Line2D([], [], marker="o", ls="", color="#e0413a", markeredgecolor="black", label=f"captured ({len(captured)})"),
        Line2D([], [], marker="o", ls="", color="#a6c8e0", label="module" if module_level else "op"),
    ], loc="upper right", fontsize=8)  # fmt: skip
    ax.set_axis_off()
    kind = "modules" if module_level else "ops"
    fig.suptitle(title or f"{g.graph.get('name', 'model')}: {g.number_of_nodes()} {kind}, data flows downwards")
    _save(fig, save, dpi)
    return fig


# -- `fxcapture graph MODEL` -------------------------------------------------------------
def add_cli_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("model", help="SOURCE:NAME, e.g. torchvision:resnet18, timm:vit_small_patch16_224, demo:vit")
    parser.add_argument("--names", nargs="*", default=[], help="selectors to highlight, e.g. layer4 attn")
    parser.add_argument("--out", default="graph.svg", help="drawing to write (.svg, .png, .pdf; default graph.svg)")
    parser.add_argument("--view", choices=["module", "node"], default="module",
                        help="one node per called module (default) or per fx op")  # fmt: skip
    parser.add_argument("--depth", type=int, default=None,
                        help="module view: cut module paths after this many components (default: fit ~80 nodes)")  # fmt: skip
    parser.add_argument("--graphml", default=None, help="also write the graph as GraphML to this file")
    parser.add_argument("--no-shapes", action="store_true", help="skip running an example input for shapes")


def _auto_depth(g: nx.DiGraph, limit: int = 80) -> int | None:
    for depth in range(1, 12):
        if module_view(g, depth).number_of_nodes() > limit:
            return max(depth - 1, 1)
    return None


def run_cli(args: argparse.Namespace) -> int:
    from .models import build_model, example_input

    model = build_model(args.model)
    example = None if args.no_shapes else example_input(model)
    g = to_networkx(model, example, names=args.names or None)
    if args.view == "module":
        depth = args.depth if args.depth is not None else _auto_depth(g)
        g = module_view(g, depth)
    if args.graphml:
        nx.write_graphml(g, args.graphml)
        print(f"wrote {args.graphml}")
    draw(g, save=args.out, title=f"{args.model} ({args.view} view), captured: {', '.join(args.names) or 'none'}")
    captured = sum(1 for _, d in g.nodes(data=True) if d["captured"])
    print(f"wrote {args.out}: {g.number_of_nodes()} nodes, {g.number_of_edges()} edges, {captured} captured")
    return 0


__all__ = ["draw", "module_view", "to_networkx"]
