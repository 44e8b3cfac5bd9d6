"""to_networkx / module_view / GraphML / drawing, against torch.fx's own trace and
forward hooks."""

from __future__ import annotations

import shutil

import networkx as nx
import pytest
import torch
import torch.fx as fx

from conftest import hook_values, tiny_gpt2
from fxcapture import capture
from fxcapture.cli import main
from fxcapture.inspect.draw import draw
from fxcapture.cli.models import TinyViT
from fxcapture.inspect.graph import module_view, to_networkx
from fxcapture.inspect import layout as layout_module
from fxcapture.inspect.layout import layered_layout, layout


@pytest.fixture(scope="module")
def resnet_graph(resnet18):
    return to_networkx(resnet18, torch.randn(1, 3, 64, 64), names=["layer4", "layer1.0.relu@0"])


def matches_fx_trace(g: nx.DiGraph, model: torch.nn.Module, returned=()) -> dict[str, fx.Node]:
    """Assert ``g`` has one node per node of ``torch.fx.symbolic_trace(model)``, in order,
    with the same op, module and edges (plus one to the output from each fx node named
    in ``returned``); return ``{name in g: fx node}``. (fxcapture records an in-place
    ``out += x`` as ``iadd`` where fx records ``add``.)"""
    fx_nodes = list(fx.symbolic_trace(model).graph.nodes)
    assert len(g) == len(fx_nodes)
    match = dict(zip(g, fx_nodes))
    for name, node in match.items():
        assert name == node.name or name == "i" + node.name, (name, node.name)
        assert g.nodes[name]["op"] == node.op
        if node.op == "call_module":
            assert g.nodes[name]["target"] == g.nodes[name]["module"] == node.target
    users = {(n.name, u.name) for n in fx_nodes for u in n.users}
    users |= {(name, "output") for name in returned}
    assert {(match[a].name, match[b].name) for a, b in g.edges} == users
    assert g.number_of_edges() == len(users)
    return match


def test_one_node_per_fx_node_and_edges_equal_users(resnet18, resnet_graph):
    matches_fx_trace(resnet_graph, resnet18)
    assert nx.is_directed_acyclic_graph(resnet_graph)


def test_node_attributes_module_shape_captured(resnet18, resnet_graph):
    g = resnet_graph
    x = torch.randn(1, 3, 64, 64)
    _, seen = hook_values(resnet18, ["layer4", "layer1.0.conv1"], x)
    conv = g.nodes["layer1_0_conv1"]
    assert (conv["op"], conv["target"], conv["module"]) == ("call_module", "layer1.0.conv1", "layer1.0.conv1")
    assert conv["shape"] == str(tuple(seen["layer1.0.conv1"][0].shape))
    assert conv["dtype"] == "float32" and not conv["captured"]
    captured = {n for n, d in g.nodes(data=True) if d["captured"]}
    assert captured == {"layer1_0_relu", "layer4_1_relu_1"}
    last = g.nodes["layer4_1_relu_1"]
    assert last["shape"] == str(tuple(seen["layer4"][0].shape))
    assert "layer4" in last["module_output"].split(", ")
    assert "layer4.1:out" in last["locals"].split(", ")


def test_module_view_has_one_node_per_called_module(resnet18, resnet_graph):
    called = []
    hooks = [m.register_forward_hook(lambda m, a, o, p=p: called.append(p))
             for p, m in resnet18.named_modules() if p]  # fmt: skip
    try:
        with torch.no_grad():
            resnet18(torch.randn(1, 3, 64, 64))
    finally:
        for h in hooks:
            h.remove()
    view = module_view(resnet_graph)
    modules = {d["module"] for n, d in view.nodes(data=True) if d["kind"] == "module"}
    assert modules == set(called)
    assert [n for n, d in view.nodes(data=True) if d["kind"] == "input"] == ["x"]
    # layer1.0.relu runs twice: one node per call, as capture keys them, so the view is acyclic
    twice = {p for p in called if called.count(p) == 2}
    assert twice and all(f"{p}@0" in view and f"{p}@1" in view and p not in view for p in twice)
    assert view.has_edge("layer1.0.bn1", "layer1.0.relu@0") and view.has_edge("layer1.0.relu@0", "layer1.0.conv2")
    assert view.has_edge("layer1.0", "layer1.0.relu@1") and view.nodes["layer1.0"]["targets"] == "iadd"
    assert nx.is_directed_acyclic_graph(view)
    top = module_view(resnet_graph, depth=1)
    assert list(top) == ["x", "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3",
                         "layer4", "avgpool", "%flatten", "fc", "(output)"]  # fmt: skip
    assert nx.is_directed_acyclic_graph(top) and nx.has_path(top, "x", "(output)")
    assert top.nodes["layer4"]["captured"] and not top.nodes["layer3"]["captured"]
    assert top.nodes["layer4"]["shape"] == "(1, 512, 2, 2)"


def test_graphml_round_trip(resnet_graph, tmp_path):
    for g in (resnet_graph, module_view(resnet_graph, depth=2)):
        path = tmp_path / "g.graphml"
        nx.write_graphml(g, path)
        back = nx.read_graphml(path)
        assert list(back) == list(g) and set(back.edges) == set(g.edges)
        for node, data in g.nodes(data=True):
            assert back.nodes[node] == data


def test_extractor_graph_marks_its_captures(resnet18):
    x = torch.randn(1, 3, 64, 64)
    fx_nodes = list(fx.symbolic_trace(resnet18).graph.nodes)
    # layer2's output is what layer3 reads; fc's is the fc call
    layer2 = next(n for n in fx_nodes if n.target == "layer3.0.conv1").args[0]
    fc = next(n for n in fx_nodes if n.target == "fc")
    g = to_networkx(capture(resnet18, ["layer2", "fc"]), x)
    match = matches_fx_trace(g, resnet18, returned=[layer2.name])  # the extractor returns it
    captured = {match[n].name for n, d in g.nodes(data=True) if d["captured"]}
    assert captured == {layer2.name, fc.name}
    _, seen = hook_values(resnet18, ["layer2", "fc"], x)
    by_fx_name = {node.name: name for name, node in match.items()}
    for path, node in (("layer2", layer2), ("fc", fc)):
        assert g.nodes[by_fx_name[node.name]]["shape"] == str(tuple(seen[path][0].shape))


def test_bad_input_is_a_clear_error():
    with pytest.raises(TypeError, match="nn.Module"):
        to_networkx("resnet18")


def test_draw_and_cli(resnet_graph, tmp_path):
    from matplotlib.image import imread

    fig = draw(module_view(resnet_graph, depth=2), save=tmp_path / "m.png")
    pixels = imread(tmp_path / "m.png")
    width, height = fig.get_size_inches() * fig.dpi
    assert pixels.shape[:2] == (round(height), round(width))
    assert pixels[..., :3].std() > 0.05
    with pytest.raises(ValueError, match="module_view"):
        draw(resnet_graph, max_nodes=10)

    out, graphml = tmp_path / "g.svg", tmp_path / "g.graphml"
    assert main(["graph", "demo:vit", "--names", "attn", "--out", str(out), "--graphml", str(graphml)]) == 0
    assert out.read_text().lstrip().startswith(("<?xml", "<svg"))
    view = nx.read_graphml(graphml)
    assert sum(d["captured"] for _, d in view.nodes(data=True)) == 4  # the 4 blocks' attn
    assert main(["graph", "demo:vit", "--view", "node", "--out", str(tmp_path / "n.png")]) == 0


def test_module_view_of_a_residual_block_is_acyclic():
    """A block's own ops (its two residual sums) around its MLP make two nodes, not a
    cycle; every module call is one node, whose ops are those forward hooks see."""
    g = to_networkx(TinyViT().eval(), torch.randn(1, 3, 64, 64), names=["attn"])
    view = module_view(g)
    assert nx.is_directed_acyclic_graph(view)
    sums = [n for n, d in view.nodes(data=True) if d["module"] == "blocks.0" and d["targets"] == "add"]
    assert len(sums) == 2 and nx.has_path(view, sums[0], "blocks.0.mlp.0")
    assert nx.has_path(view, "blocks.0.mlp.2", sums[1]) and not nx.has_path(view, sums[1], sums[0])
    assert view.nodes["blocks.0.attn"]["captured"] and view.has_edge("blocks.0.attn.qkv", "blocks.0.attn")


def test_layered_layout_goes_down_and_routes_long_edges_between_boxes():
    g = nx.DiGraph([("a", "b"), ("b", "c"), ("c", "d"), ("a", "d"), ("e", "c")])
    sizes = {n: (1.0, 0.3) for n in g}
    placed = layered_layout(g, sizes)
    y = {n: p[1] for n, p in placed.positions.items()}
    assert all(y[u] - y[v] >= 0.3 for u, v in g.edges)  # down, boxes apart
    assert y["e"] == y["b"]  # a constant sits just above its user, not with the inputs
    skip = placed.routes["a", "d"]
    for n in "bc":  # the long edge passes beside b and c, not through them
        x, yn = placed.positions[n]
        at_n = [px for px, py in skip if abs(py - yn) < 1e-9]
        assert at_n and all(abs(px - x) > 0.5 for px in at_n)


def test_without_graphviz_the_layered_layout_is_used(monkeypatch):
    g = nx.DiGraph([("a", "b")])
    sizes = {"a": (1.0, 0.3), "b": (1.0, 0.3)}
    monkeypatch.setattr(layout_module.shutil, "which", lambda name: None)
    assert layout(g, sizes).engine == "layered"
    with pytest.raises(RuntimeError, match="apt install graphviz"):
        layout(g, sizes, engine="dot")
    with pytest.raises(ValueError, match="'auto', 'dot' or 'layered'"):
        layout(g, sizes, engine="neato")


def _drawn_boxes(fig):
    """{node: box} of a drawing and the renderer, from the patches draw() tags with gids."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    (ax,) = fig.axes
    boxes = {p.get_gid()[5:]: p.get_window_extent(renderer)
             for p in ax.patches if (p.get_gid() or "").startswith("node:")}  # fmt: skip
    return boxes, [t.get_window_extent(renderer) for t in ax.texts], renderer


ENGINES = ["layered"] + (["dot"] if shutil.which("dot") else [])


def assert_reads_down(fig, g: nx.DiGraph) -> None:
    """Every edge goes down, no two boxes overlap, every label is inside a box."""
    boxes, texts, _ = _drawn_boxes(fig)
    assert len(boxes) == len(texts) > 10
    drawn = g.subgraph(boxes)
    assert drawn.number_of_edges() >= len(boxes) - 1
    for u, v in drawn.edges:
        assert boxes[u].y0 > boxes[v].y1, f"{u} -> {v} does not go down"
    items = list(boxes.values())
    for i, a in enumerate(items):
        for b in items[i + 1 :]:
            assert not a.overlaps(b), "two boxes overlap"
    for text in texts:
        assert any(box.x0 <= text.x0 and text.x1 <= box.x1 and box.y0 <= text.y0 and text.y1 <= box.y1
                   for box in items)  # fmt: skip


@pytest.mark.parametrize("engine", ENGINES)
def test_drawing_flows_down_and_nothing_overlaps(resnet_graph, engine):
    """For a residual network's module view and a transformer's op view."""
    vit = to_networkx(TinyViT().eval(), torch.randn(1, 3, 64, 64), names=["attn"])
    for g in (module_view(resnet_graph), vit):
        assert_reads_down(draw(g, engine=engine), g)


def test_an_exported_graph_reads_as_module_calls():
    """A transformers model traced by running it (torch.export): parameters read at the
    root go with the call using them, size reads are hidden, the calls are those hooks see."""
    model = tiny_gpt2()
    ids = torch.randint(0, 100, (2, 8))
    ex = capture(model, ["transformer.h.1"], example_inputs=(ids,))
    assert ex.tracer == "running"
    view = module_view(to_networkx(ex, ids))
    assert nx.is_directed_acyclic_graph(view)
    _, seen = hook_values(model, ["transformer.h.0.mlp", "transformer.h.1"], ids)
    assert view.nodes["transformer.h.0.mlp.c_fc"]["kind"] == "module"
    assert any(d["captured"] for _, d in view.nodes(data=True) if d["module"] == "transformer.h.1")
    assert view.nodes["transformer.h.0.mlp.c_proj"]["shape"] == str(tuple(seen["transformer.h.0.mlp"][0].shape))
    roots = [n for n, d in view.nodes(data=True) if d["kind"] == "op"]
    assert [n for n in roots if "sym_size" in n or n.endswith(("_weight", "_bias"))] == ["%lm_head_weight"], roots
    assert view.has_edge("%lm_head_weight", "transformer.wte")  # tied: read by two calls
    assert_reads_down(draw(view, engine="layered"), view)
