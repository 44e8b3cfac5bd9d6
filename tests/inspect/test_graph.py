"""to_networkx / module_view / GraphML / drawing, against torch.fx's own trace and
forward hooks."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
import torch.fx as fx

from conftest import hook_values
from fxcapture import capture
from fxcapture.cli import main
from fxcapture.inspect.draw import draw
from fxcapture.inspect.graph import module_view, to_networkx


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
    modules = {n for n, d in view.nodes(data=True) if d["kind"] == "module"}
    assert modules == set(called)
    assert [n for n, d in view.nodes(data=True) if d["kind"] == "input"] == ["x"]
    # layer1.0.relu runs twice: one node, so data flow through it makes a cycle
    assert view.has_edge("layer1.0.bn1", "layer1.0.relu") and view.has_edge("layer1.0.relu", "layer1.0.conv2")
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
