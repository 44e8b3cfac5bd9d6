"""The command line's parser and error policy (``fxcapture.cli.main`` imports it).

Every error ends with an error line on stderr, never a traceback: exit status 2 for what
the command line can fix (checked before the model is built or traced where it can be),
1 for anything else (with a line saying how to see its traceback), 130 for Ctrl-C.
"""

from __future__ import annotations

import argparse
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
    parser = argparse.ArgumentParser(prog="fxcapture", description="Command line: fxcapture demo | names | extract | graph | attention.")
    parser.add_argument("--version", action="version", version=f"fxcapture {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in _COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_cli_arguments(sub, name)
        sub.set_defaults(run=module.run_cli)
    return parser


# errors a user can fix by changing the command (exit 2, as argparse's own)
USAGE_ERRORS = (ValueError, TypeError, LookupError, OSError, ImportError)


def main(argv: list[str] | None = None) -> int:
    """Run one command; every error is one line on stderr: exit 2 for what the command
    line can fix, 1 for anything else (``FXCAPTURE_TRACEBACK=1`` shows the traceback),
    130 for Ctrl-C wherever it comes."""
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        return _interrupted("fxcapture")
    run: Callable[[argparse.Namespace], int | None] = args.run
    where = f"fxcapture {args.command}"
    token = HOW_TO_LIST.set(f"fxcapture names {getattr(args, 'model', None) or 'MODEL'}")  # errors name the CLI
    try:
        return run(args) or 0
    except BrokenPipeError:  # `fxcapture names ... | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return _interrupted(where)
    except Exception as err:
        if os.environ.get("FXCAPTURE_TRACEBACK"):
            raise
        usage = isinstance(err, USAGE_ERRORS)
        print(f"{where}: error: {_one_line(err, named=not usage)}", file=sys.stderr)
        if not usage:
            print(f"{where}: this looks like a bug in fxcapture or in the model; FXCAPTURE_TRACEBACK=1 "
                  "shows where it happened", file=sys.stderr)  # fmt: skip
        return 2 if usage else 1
    finally:
        HOW_TO_LIST.reset(token)


def _interrupted(where: str) -> int:
    print(f"{where}: interrupted", file=sys.stderr)
    return 130


def _one_line(err: BaseException, named: bool) -> str:
    """The error's message on one line (the first line of a multi-line one), with its
    type when it is not self-explanatory; an ``[Errno 28] ...: 'path'`` as ``path: cause``."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror.lower()}"
    else:
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if named or not text:
        text = f"{type(err).__name__}: {text}".rstrip(": ")
    return text
