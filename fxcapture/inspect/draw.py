"""Drawings of a graph from :func:`~.graph.to_networkx` or :func:`~.graph.module_view`.

Needs matplotlib (``pip install fxcapture[viz]``).

Example::

    >>> draw(module_view(to_networkx(model, names="layer4"), depth=2), save="g.svg")
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx

from .graph import leftovers
from .viz import _figure, _save

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _layers(g: nx.DiGraph) -> dict[Any, int]:
    """Longest-path depth of every node from the inputs, along edges that go forward in
    execution order (a module called twice makes cycles in the module view)."""
    order = {n: d.get("order", i) for i, (n, d) in enumerate(g.nodes(data=True))}
    depth: dict[Any, int] = {}
    for node in sorted(g, key=order.__getitem__):
        earlier = [p for p in g.predecessors(node) if order[p] < order[node]]
        depth[node] = max((depth[p] + 1 for p in earlier), default=0)
    return depth


def _short(text: str, width: int = 30) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


def _label(node: str, data: dict, module_level: bool) -> str:
    """Module view: the module path, plus what was captured inside it when that is not the
    module itself; op view: the selected key of a captured op, else the local or module
    output it holds."""
    keys = [k for k in data.get("captured_as", "").split(", ") if k]
    if module_level:
        name = _short(node)
        inside = [k for k in keys if k.partition("@")[0] != node]
        if inside and len(inside) == len(keys):
            name += f"\n[{_short(inside[0], 26)}" + (f" +{len(inside) - 1}]" if len(inside) > 1 else "]")
    elif keys:
        name = _short(keys[0]) + (f" (+{len(keys) - 1})" if len(keys) > 1 else "")
    else:
        name = _short((data.get("locals") or data.get("module_output") or node).split(", ")[0])
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
    if g.number_of_nodes() > max_nodes:
        raise ValueError(
            f"{g.number_of_nodes()} nodes is too many to draw legibly (max_nodes={max_nodes}); "
            "draw module_view(graph, depth=...) instead (fxcapture graph --view module --depth N)"
        )
    module_level = "ops" in next(iter(g.nodes.values()), {})  # a module_view
    if module_level:  # containers without ops of their own add nothing to the picture
        g = g.subgraph([n for n, d in g.nodes(data=True) if d["ops"] or g.degree(n)])
    else:
        g = g.subgraph(set(g) - leftovers(g))
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
    plain_size = 260 if module_level else 25
    sizes = [120 if g.nodes[n].get("captured") else plain_size for n in g]
    nx.draw_networkx_edges(g, pos, ax=ax, edge_color="#7a7a7a", arrows=True, arrowstyle="-|>",
                           arrowsize=9, width=0.7, node_size=sizes)  # fmt: skip
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
    from matplotlib.lines import Line2D  # optional dependency, checked by _figure

    ax.legend(handles=[
        Line2D([], [], marker="o", ls="", color="#e0413a", markeredgecolor="black", label=f"captured ({len(captured)})"),
        Line2D([], [], marker="o", ls="", color="#a6c8e0", label="module" if module_level else "op"),
    ], loc="upper right", fontsize=8)  # fmt: skip
    ax.set_axis_off()
    kind = "modules" if module_level else "ops"
    fig.suptitle(title or f"{g.graph.get('name', 'model')}: {g.number_of_nodes()} {kind}, data flows downwards")
    _save(fig, save, dpi)
    return fig


__all__ = ["draw"]
