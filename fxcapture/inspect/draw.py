"""Drawings of a graph from :func:`~.graph.to_networkx` or :func:`~.graph.module_view`.

Needs matplotlib (``pip install fxcapture[viz]``).

Example::

    >>> draw(module_view(to_networkx(model, names="layer4"), depth=2), save="g.svg")
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Hashable

import networkx as nx

from .graph import leftovers
from .layout import layout
from .viz import _figure, _save

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_FONT = 7  # points, node labels
_PAD = (0.07, 0.045)  # inches between a label and its box, across and down
_MARGIN, _HEADER = 0.25, 0.75  # inches around the graph, above it for title and legend
_COLOURS = {  # fill, edge
    "captured": ("#f6c1bc", "#b8332a"),
    "module": ("#d7e7f5", "#4a6f8a"),
    "op": ("#fbf0d2", "#9a7b2f"),
    "io": ("#e8e8e8", "#707070"),
}
_LEGEND = {"captured": "captured", "module": "module call", "op": "function / method", "io": "input / output"}


def _short(text: str, width: int = 30) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


def _label(node: str, data: dict, module_level: bool) -> str:
    """Module view: the module call, what its own ops do (``layer1.0 · iadd``: the
    residual sum of a block) and what was captured inside it when that is not the
    module itself; op view: the selected key of a captured op, else the local or
    module output it holds, else the op. The shape goes on the last line."""
    keys = [k for k in data.get("captured_as", "").split(", ") if k]
    if module_level:
        name = _short(node.partition(":%")[0])  # a call's later run shows as the call
        targets = [t for t in data.get("targets", "").split(", ") if t]
        if targets:
            name += " · " + (", ".join(targets) if len(targets) <= 2 else f"{data['ops']} ops")
        inside = [k for k in keys if k.partition("@")[0] != data.get("module", node)]
        if inside and len(inside) == len(keys):
            name += f"\n[{_short(inside[0], 26)}" + (f" +{len(inside) - 1}]" if len(inside) > 1 else "]")
    elif keys:
        name = _short(keys[0]) + (f" (+{len(keys) - 1})" if len(keys) > 1 else "")
    else:
        name = _short((data.get("locals") or data.get("module_output") or node).split(", ")[0])
        if data.get("op") in ("call_function", "call_method"):
            name += f" · {data['target']}" if name != node else ""
    return f"{name}\n{data['shape']}" if data.get("shape") else name


def _style(data: dict, module_level: bool) -> str:
    if data.get("captured"):
        return "captured"
    kind = data.get("kind") if module_level else {"call_module": "module", "placeholder": "input",
                                                    "output": "output"}.get(data.get("op"), "op")  # fmt: skip
    return "io" if kind in ("input", "output") else kind


def _text_sizes(labels: dict[Hashable, str], dpi: int) -> dict[Hashable, tuple[float, float]]:
    """{node: (width, height)} of its label's box, in inches, as matplotlib renders it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # optional dependency
    from matplotlib.figure import Figure

    scratch = Figure(dpi=dpi)
    renderer = FigureCanvasAgg(scratch).get_renderer()
    sizes = {}
    for node, label in labels.items():
        box = scratch.text(0, 0, label, fontsize=_FONT, ha="center", va="center").get_window_extent(renderer)
        sizes[node] = (box.width / dpi + 2 * _PAD[0], box.height / dpi + 2 * _PAD[1])
    return sizes


def draw(
    g: nx.DiGraph,
    *,
    title: str | None = None,
    max_nodes: int = 400,
    dpi: int = 100,
    engine: str = "auto",
    save: str | Path | None = None,
) -> "Figure":
    """Draw a graph from :func:`to_networkx` or :func:`module_view` in layers along the
    data flow, inputs at the top: each node a box with its label inside, captured
    values red. ``engine`` is ``"auto"`` (graphviz's ``dot`` when installed, else a
    layered layout of fxcapture's own), ``"dot"`` or ``"layered"``
    (:mod:`fxcapture.inspect.layout`).

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
    g = g.subgraph(sorted(g, key=lambda n: g.nodes[n].get("order", 0)))  # execution order
    labels = {n: _label(n, g.nodes[n], module_level) for n in g}
    sizes = _text_sizes(labels, dpi)
    placed = layout(g, sizes, engine=engine)
    pos = placed.positions
    x0 = min((pos[n][0] - sizes[n][0] / 2 for n in g), default=0.0)
    x1 = max((pos[n][0] + sizes[n][0] / 2 for n in g), default=1.0)
    y0 = min((pos[n][1] - sizes[n][1] / 2 for n in g), default=0.0)
    y1 = max((pos[n][1] + sizes[n][1] / 2 for n in g), default=1.0)
    kind = "module call" if module_level else "op"
    title = title or f"{g.graph.get('name', 'model')}: {len(g)} nodes, one per {kind}, data flows downwards"
    width = max(x1 - x0 + 2 * _MARGIN, 0.1 * len(title) + 1.0, 6.0)  # room for the title
    height = y1 - y0 + _MARGIN + _HEADER
    fig = _figure(figsize=(width, height), dpi=dpi)
    fig.set_layout_engine("none")  # one data unit is one inch: boxes keep their measured sizes
    ax = fig.add_axes(((width - (x1 - x0)) / 2 / width, _MARGIN / height, (x1 - x0) / width, (y1 - y0) / height))
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_axis_off()
    _draw_edges(ax, placed.routes)
    styles = {n: _style(g.nodes[n], module_level) for n in g}
    _draw_boxes(ax, pos, sizes, labels, styles)
    _legend(fig, styles, height)
    fig.suptitle(title, y=1 - 0.12 / height, va="top", fontsize=11)
    _save(fig, save, dpi)
    return fig


def _draw_edges(ax: Any, routes: dict) -> None:
    from matplotlib.patches import FancyArrowPatch
    from matplotlib.path import Path as Curve

    for points in routes.values():
        codes = [Curve.MOVETO] + [Curve.CURVE4] * (len(points) - 1)
        ax.add_patch(FancyArrowPatch(path=Curve(points, codes), arrowstyle="-|>", mutation_scale=7,
                                     color="#6b6b6b", linewidth=0.7, clip_on=False, zorder=1))  # fmt: skip


def _draw_boxes(ax: Any, pos: dict, sizes: dict, labels: dict, styles: dict) -> None:
    from matplotlib.patches import FancyBboxPatch

    for node, (x, y) in pos.items():
        w, h = sizes[node]
        fill, edge = _COLOURS[styles[node]]
        width = 1.4 if styles[node] == "captured" else 0.6
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0,rounding_size=0.04",
                                    facecolor=fill, edgecolor=edge, linewidth=width, clip_on=False, zorder=2,
                                    gid=f"node:{node}"))  # fmt: skip
        ax.text(x, y, labels[node], ha="center", va="center", fontsize=_FONT, zorder=3, clip_on=False)


def _legend(fig: "Figure", styles: dict, height: float) -> None:
    from matplotlib.patches import Patch

    counts = {style: list(styles.values()).count(style) for style in _LEGEND}
    handles = [Patch(facecolor=_COLOURS[s][0], edgecolor=_COLOURS[s][1], label=f"{text} ({counts[s]})")
               for s, text in _LEGEND.items() if counts[s]]  # fmt: skip
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.4 / height), ncols=len(handles),
               frameon=False, fontsize=8, handlelength=1.2)  # fmt: skip


__all__ = ["draw"]
