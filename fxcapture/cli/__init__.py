"""Command line: ``fxcapture demo | names | extract | graph``.

Shell code only: each command is a module of this package with ``add_cli_arguments``
and ``run_cli``, plus the model specs (``models``) and the demo; it may import every
package, and the library packages never import from here. Errors a user can fix
end with a one-line message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Callable

from .._version import __version__
from ..core.select import HOW_TO_LIST
from . import attention, demo, extract, graph, names

# name -> (module, help)
_COMMANDS = {
    "demo": (demo, "Capture attention maps and module outputs of a random-weight ViT."),
    "names": (names, "List the capturable names of a model."),
    "extract": (extract, "Run a dataset through a model and store intermediates."),
    "graph": (graph, "Draw a model's graph, highlighting captured values."),
    "attention": (attention, "Draw a model's attention maps: grid, CLS overlay, rollout."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxcapture", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fxcapture {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in _COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_cli_arguments(sub, name)
        sub.set_defaults(run=module.run_cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int | None] = args.run
    token = HOW_TO_LIST.set(f"fxcapture names {getattr(args, 'model', None) or 'MODEL'}")  # errors name the CLI
    try:
        return run(args) or 0
    except BrokenPipeError:  # `fxcapture names ... | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (ValueError, TypeError, FileExistsError, FileNotFoundError, ImportError) as err:
        print(f"fxcapture {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno == errno.ENOSPC:
            print(f"fxcapture {args.command}: error: no space left on device: {err}", file=sys.stderr)
        else:
            print(f"fxcapture {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        HOW_TO_LIST.reset(token)
