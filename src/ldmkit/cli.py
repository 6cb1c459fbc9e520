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


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    from ldmkit.autoencoder import commands as autoencoder_commands
    from ldmkit.data import commands as data_commands
    from ldmkit.io import commands as io_commands
    from ldmkit.metrics import commands as metrics_commands
    from ldmkit.pipelines import commands as pipeline_commands
    from ldmkit.training import commands as training_commands

    parser = argparse.ArgumentParser(prog="ldm", description="ldmkit: latent diffusion end to end")
    parser.add_argument("--version", action="version", version=f"ldmkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (autoencoder_commands, data_commands, training_commands, pipeline_commands, io_commands, metrics_commands):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError, FileExistsError) as exc:
        if os.environ.get("LDM_DEBUG"):  # developers: the full traceback
            raise
        print(f"ldm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ldm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
