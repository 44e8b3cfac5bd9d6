"""``fxcapture names MODEL [PATTERN]``: list a model's capturable names."""

from __future__ import annotations

import argparse

from ..core.api import list_names
from .models import build_model, example_call


def add_cli_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("model", help="SOURCE:NAME, e.g. torchvision:resnet50, timm:vit_small_patch16_224, demo:vit")
    parser.add_argument("pattern", nargs="?", default=None, help="glob over keys, e.g. 'layer4*'")
    parser.add_argument("--kind", action="append", choices=["module", "local", "node"],
                        help="only these kinds (repeatable); default: modules and locals")  # fmt: skip
    parser.add_argument("--attention", choices=["weights"], default=None,
                        help="list attn_probs too: compute fused attention explicitly (implied by a pattern naming attn_probs)")  # fmt: skip


def run_cli(args: argparse.Namespace) -> int:
    model = build_model(args.model)
    table = list_names(model, args.pattern, kinds=args.kind or ("module", "local"), attention=args.attention,
                       example_inputs=example_call(model), how_to_list=f"fxcapture names {args.model}")  # fmt: skip
    print(repr(table))
    return 0
