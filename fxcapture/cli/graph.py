"""``fxcapture graph MODEL``: draw a model's graph, captured values highlighted."""

from __future__ import annotations

import argparse

import networkx as nx

from ..dataset.files import check_output_file
from ..inspect.draw import draw
from ..inspect.graph import module_view, to_networkx
from .models import build_model, example_input


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
    parser.add_argument("--attention", choices=["weights"], default=None,
                        help="draw fused attention explicitly, with its attn_probs (implied by --names attn_probs)")  # fmt: skip


def _auto_depth(g: nx.DiGraph, limit: int = 80) -> int | None:
    for depth in range(1, 12):
        if module_view(g, depth).number_of_nodes() > limit:
            return max(depth - 1, 1)
    return None


def run_cli(args: argparse.Namespace) -> int:
    for path, option in ((args.out, "--out"), (args.graphml, "--graphml")):
        if path is not None:
            check_output_file(path, option)
    model = build_model(args.model)
    example = None if args.no_shapes else example_input(model)
    g = to_networkx(model, example, names=args.names or None, attention=args.attention)
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
