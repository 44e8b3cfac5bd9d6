"""Command line: ``fxcapture demo | names | extract | graph | attention``.

Shell code only: each command is a module of this package with ``add_cli_arguments``
and ``run_cli``, plus the model specs (``models``) and the demo; it may import every
package, and the library packages never import from here. The parser and the error
policy live in ``app``; this module stays light so that a Ctrl-C while torch is still
being imported ends as every other Ctrl-C does (``fxcapture: interrupted``, exit 130),
not with a traceback.

Example::

    >>> from fxcapture.cli import main
    >>> main(["names", "demo:vit", "--kind", "local"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Run one command (see ``fxcapture --help``); returns the exit status."""
    try:
        from .app import main as run_command
    except KeyboardInterrupt:  # torch and the library are still being imported
        print("fxcapture: interrupted", file=sys.stderr)
        return 130
    return run_command(argv)


def build_parser() -> argparse.ArgumentParser:
    """The ``fxcapture`` argument parser, every command's options included."""
    from .app import build_parser as build

    return build()
