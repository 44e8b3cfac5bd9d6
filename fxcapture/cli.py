"""Command line: ``fxcapture demo | names | extract | graph``.

Each subcommand lives with the stage it drives; this module only dispatches.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

# name -> (module, function adding the subcommand's arguments, function running it)
_SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("fxcapture.demo", "Capture attention maps and module outputs of a random-weight ViT."),
    "names": ("fxcapture.models", "List the capturable names of a model."),
    "extract": ("fxcapture.extract", "Run a dataset through a model and store intermediates."),
    "graph": ("fxcapture.graph", "Draw a model's graph, highlighting captured values."),
}


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="fxcapture", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in _SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_cli_arguments(sub, name)
        sub.set_defaults(run=module.run_cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int | None] = args.run
    try:
        return run(args) or 0
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"fxcapture {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
