"""The `ldm` command.

Each area of the library registers its own subcommands through a
`register(subparsers)` function in its `commands.py`; this file only wires them
and turns user errors into one-line messages with exit code 2 (set LDM_DEBUG=1
to see the traceback instead).
"""
from __future__ import annotations

import argparse
import os
import sys

from ldmkit import __version__
from ldmkit.errors import UserError, describe, known_bad_input

# subcommand modules, each with register(subparsers); imported when the parser is built
COMMAND_MODULES = ("ldmkit.autoencoder.commands", "ldmkit.data.commands", "ldmkit.training.commands",
                   "ldmkit.pipelines.commands", "ldmkit.io.commands", "ldmkit.metrics.commands",
                   "ldmkit.serve.commands")


class _Parser(argparse.ArgumentParser):
    """argparse with exit code 2 and one line for every usage error (as argparse itself does),
    also for values argparse converts itself."""

    def error(self, message):  # pragma: no cover - argparse calls it
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `ldm` parser; `argv` lets a command shape its flags by the command line (`ldm train --method`)."""
    import importlib

    parser = _Parser(prog="ldm", description="ldmkit: latent diffusion end to end")
    parser.add_argument("--version", action="version", version=f"ldmkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub, argv)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"ldm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        user = isinstance(exc, (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
                                IsADirectoryError, PermissionError)) or known_bad_input(exc)
        if not user or os.environ.get("LDM_DEBUG"):  # a bug, or a developer asking for the traceback
            raise
        print(f"ldm {args.command}: error: {describe(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
