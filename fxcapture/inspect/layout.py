"""Where each node of a drawing goes: layers along the data flow, top to bottom.

:func:`layout` uses graphviz's ``dot`` when it is installed and otherwise
:func:`layered_layout`, a small Sugiyama layout of the same kind (layers by longest
path, crossings reduced by barycenters, long edges routed between the nodes). Both
take each node's box size in inches and give box centres in inches (``y`` grows
upwards, so every edge goes down) and each edge's route as cubic Bezier control
points (``3k + 1`` points, from the bottom of one box to the top of the next).

Example::

    >>> placed = layout(nx.DiGraph([("x", "conv"), ("conv", "relu")]), {n: (1.0, 0.3) for n in "x conv relu".split()})
    >>> placed.positions["x"][1] > placed.positions["conv"][1] > placed.positions["relu"][1]
    True
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any, Hashable, NamedTuple

import networkx as nx

Point = tuple[float, float]


class Layout(NamedTuple):
    """Box centres and edge routes, in inches; ``engine`` is ``"dot"`` or ``"layered"``."""

    positions: dict[Hashable, Point]
    routes: dict[tuple[Hashable, Hashable], list[Point]]
    engine: str


def layout(g: nx.DiGraph, sizes: dict[Hashable, Point], *, engine: str = "auto") -> Layout:
    """Lay ``g`` out top to bottom; ``engine`` is ``"auto"`` (``dot`` when installed),
    ``"dot"`` or ``"layered"``.

    Example::

        >>> layout(g, {n: (1.2, 0.3) for n in g}).engine in ("dot", "layered")
        True
    """
    if engine not in ("auto", "dot", "layered"):
        raise ValueError(f"engine={engine!r}: use 'auto', 'dot' or 'layered'")
    if engine != "layered":
        placed = dot_layout(g, sizes)
        if placed is not None:
            return placed
        if engine == "dot":
            raise RuntimeError("graphviz's `dot` is not installed (apt install graphviz), or it failed")
    return layered_layout(g, sizes)


# -- graphviz ---------------------------------------------------------------------------
def dot_layout(g: nx.DiGraph, sizes: dict[Hashable, Point], timeout: float = 60.0) -> Layout | None:
    """The layout ``dot`` makes (boxes of the given sizes, splines for edges), or None
    when ``dot`` is not installed or fails.

    Example::

        >>> dot_layout(nx.DiGraph([("a", "b")]), {"a": (1, 0.3), "b": (1, 0.3)}).engine
        'dot'
    """
    dot = shutil.which("dot")
    if dot is None:
        return None
    ids = {node: f"n{i}" for i, node in enumerate(g)}
    lines = ["digraph {", "graph [rankdir=TB, nodesep=0.2, ranksep=0.3];",
             'node [shape=box, fixedsize=true, label=""];']  # fmt: skip
    lines += [f"{ids[n]} [width={sizes[n][0]:.3f}, height={sizes[n][1]:.3f}];" for n in g]
    lines += [f"{ids[u]} -> {ids[v]};" for u, v in g.edges if u != v]
    lines.append("}")
    try:
        plain = subprocess.run([dot, "-Tplain"], input="\n".join(lines), capture_output=True,
                               text=True, timeout=timeout, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return _parse_plain(plain, {i: n for n, i in ids.items()}, g, sizes)


def _parse_plain(plain: str, nodes: dict[str, Hashable], g: nx.DiGraph, sizes: dict[Hashable, Point]) -> Layout:
    """``dot -Tplain`` output: ``node ID X Y ...`` and ``edge TAIL HEAD N X1 Y1 ... XN YN ...``."""
    positions: dict[Hashable, Point] = {}
    routes: dict[tuple[Hashable, Hashable], list[Point]] = {}
    for line in plain.splitlines():
        fields = line.split()
        if fields[:1] == ["node"]:
            positions[nodes[fields[1]]] = (float(fields[2]), float(fields[3]))
        elif fields[:1] == ["edge"]:
            u, v, count = nodes[fields[1]], nodes[fields[2]], int(fields[3])
            coords = [float(f) for f in fields[4 : 4 + 2 * count]]
            routes[u, v] = list(zip(coords[::2], coords[1::2]))
    for (u, v), points in routes.items():  # dot stops short of the head for its arrow
        x, y = positions[v]
        end = (min(max(points[-1][0], x - sizes[v][0] / 2), x + sizes[v][0] / 2), y + sizes[v][1] / 2)
        (lx, ly) = points[-1]
        points += [(lx, ly), ((lx + end[0]) / 2, (ly + end[1]) / 2), end]
    return Layout(positions, routes, "dot")


# -- layered layout without graphviz ----------------------------------------------------
_DUMMY_WIDTH = 0.12  # the gap a long edge takes in a layer it passes through


def layered_layout(
    g: nx.DiGraph, sizes: dict[Hashable, Point], *, node_gap: float = 0.2, layer_gap: float = 0.3
) -> Layout:
    """A layered (Sugiyama) layout: longest-path layers along topological order, each
    layer ordered by the barycenter of its neighbours (sweeps down and up, the order
    with the fewest crossings kept), long edges routed through gaps between the nodes
    of the layers they cross, x placed close to the neighbours' mean.

    In a graph with cycles, edges that go against ``g``'s node order do not constrain
    the layers.

    Example::

        >>> placed = layered_layout(nx.DiGraph([("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")]),
        ...                         {n: (0.5, 0.3) for n in "abcd"})
        >>> [round(placed.positions[n][1], 2) for n in "abcd"]
        [0.0, -0.6, -0.6, -1.2]
    """
    index = {node: i for i, node in enumerate(g)}
    if nx.is_directed_acyclic_graph(g):  # g's order may not be topological (a call's first op reads a shape)
        index = {n: i for i, n in enumerate(nx.lexicographical_topological_sort(g, key=index.__getitem__))}
    dag = nx.DiGraph()
    dag.add_nodes_from(g)
    dag.add_edges_from((u, v) for u, v in g.edges if index[u] < index[v])
    layer = _layers(dag)
    # long edges pass through one dummy node per layer they cross
    chains: dict[tuple[Hashable, Hashable], list[Any]] = {}
    widths = {n: sizes[n][0] for n in g}
    ranked = nx.DiGraph()
    ranked.add_nodes_from(g)
    for u, v in dag.edges:
        chain = [u] + [("_dummy", u, v, k) for k in range(layer[u] + 1, layer[v])] + [v]
        for k, dummy in enumerate(chain[1:-1], start=layer[u] + 1):
            layer[dummy], widths[dummy] = k, _DUMMY_WIDTH
        nx.add_path(ranked, chain)
        chains[u, v] = chain
    rows = _ordered_rows(ranked, layer)
    xs = _x_positions(ranked, rows, widths, node_gap)
    heights = [max((sizes[n][1] for n in row if n in sizes), default=0.0) for row in rows]
    ys, top = [], 0.0
    for height in heights:
        ys.append(top - height / 2)
        top -= height + layer_gap
    positions = {n: (xs[n], ys[layer[n]]) for n in g}
    routes = {}
    for u, v in g.edges:
        if (u, v) in chains:
            via = [(xs[d], ys[layer[d]]) for d in chains[u, v][1:-1]]
            routes[u, v] = _smooth([_bottom(positions[u], sizes[u]), *via, _top(positions[v], sizes[v])])
        else:  # against the node order: straight, from side to side
            routes[u, v] = _smooth([positions[u], positions[v]])
    return Layout(positions, routes, "layered")


def _layers(dag: nx.DiGraph) -> dict[Hashable, int]:
    """Longest-path layers; a source (a constant, a parameter) sits just above its
    first user, not at the top with the inputs."""
    layer = {n: k for k, generation in enumerate(nx.topological_generations(dag)) for n in generation}
    for node in dag:
        if dag.in_degree(node) == 0 and dag.out_degree(node) > 0:
            layer[node] = min(layer[s] for s in dag.successors(node)) - 1
    return layer


def _ordered_rows(ranked: nx.DiGraph, layer: dict[Hashable, int], sweeps: int = 6) -> list[list[Any]]:
    """Nodes of each layer, left to right, ordered by the barycenter of their
    neighbours in the layer above (sweeping down) or below (sweeping up)."""
    rows: list[list[Any]] = [[] for _ in range(max(layer.values(), default=-1) + 1)]
    for node in ranked:  # execution order first: a chain starts in one column
        rows[layer[node]].append(node)
    best, best_crossings = [list(r) for r in rows], _crossings(ranked, rows)
    for sweep in range(sweeps):
        down = sweep % 2 == 0
        for k in range(1, len(rows)) if down else range(len(rows) - 2, -1, -1):
            fixed = {n: i for i, n in enumerate(rows[k - 1 if down else k + 1])}
            neighbours = ranked.predecessors if down else ranked.successors
            place = {n: i for i, n in enumerate(rows[k])}

            def barycenter(n: Any) -> float:
                seen = [fixed[m] for m in neighbours(n) if m in fixed]
                return sum(seen) / len(seen) if seen else place[n]

            rows[k].sort(key=barycenter)  # stable: ties keep their order
        crossings = _crossings(ranked, rows)
        if crossings < best_crossings:
            best, best_crossings = [list(r) for r in rows], crossings
    return best


def _crossings(ranked: nx.DiGraph, rows: list[list[Any]]) -> int:
    total = 0
    for upper, lower in zip(rows, rows[1:]):
        at = {n: i for i, n in enumerate(lower)}
        edges = sorted((i, at[v]) for i, u in enumerate(upper) for v in ranked.successors(u) if v in at)
        total += sum(1 for a, (i, j) in enumerate(edges) for k, l in edges[a + 1 :] if k > i and l < j)
    return total


def _x_positions(ranked: nx.DiGraph, rows: list[list[Any]], widths: dict[Any, float], gap: float,
                 rounds: int = 8) -> dict[Any, float]:  # fmt: skip
    """x of every node: each layer packed in its order, then pulled towards the mean x
    of its neighbours (above, then below, alternately) as far as the order and the
    gaps between boxes allow."""
    xs: dict[Any, float] = {}
    for row in rows:
        x = 0.0
        for node in row:
            xs[node] = x + widths[node] / 2
            x += widths[node] + gap
    for r in range(rounds):
        down = r % 2 == 0
        for row in rows if down else reversed(rows):
            wanted = []
            for node in row:
                near = [*ranked.predecessors(node), *ranked.successors(node)] if r >= rounds - 2 else (
                    list(ranked.predecessors(node) if down else ranked.successors(node)))  # fmt: skip
                wanted.append(sum(xs[m] for m in near) / len(near) if near else xs[node])
            for node, x in zip(row, _spaced(wanted, [widths[n] for n in row], gap)):
                xs[node] = x
    low = min((xs[n] - widths[n] / 2 for n in xs), default=0.0)
    return {n: x - low for n, x in xs.items()}


def _spaced(wanted: list[float], widths: list[float], gap: float) -> list[float]:
    """The positions nearest ``wanted`` (least squares) that keep the order and a
    ``gap`` between neighbouring boxes: pool-adjacent-violators on the offsets."""
    offsets = [0.0]
    for a, b in zip(widths, widths[1:]):
        offsets.append(offsets[-1] + (a + b) / 2 + gap)
    blocks: list[list[float]] = []  # [mean, count]
    for target in (w - o for w, o in zip(wanted, offsets)):
        blocks.append([target, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean, count = blocks.pop()
            blocks[-1] = [(blocks[-1][0] * blocks[-1][1] + mean * count) / (blocks[-1][1] + count),
                          blocks[-1][1] + count]  # fmt: skip
    flat = [mean for mean, count in blocks for _ in range(int(count))]
    return [y + o for y, o in zip(flat, offsets)]


def _bottom(centre: Point, size: Point) -> Point:
    return centre[0], centre[1] - size[1] / 2


def _top(centre: Point, size: Point) -> Point:
    return centre[0], centre[1] + size[1] / 2


def _smooth(points: list[Point]) -> list[Point]:
    """A polyline as cubic Bezier control points that leave and enter each point vertically."""
    curve = [points[0]]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        mid = (y0 + y1) / 2
        curve += [(x0, mid), (x1, mid), (x1, y1)]
    return curve


__all__ = ["Layout", "dot_layout", "layered_layout", "layout"]
