"""CLI subcommands of this package (registered by ldmkit.cli)."""
from __future__ import annotations


def register(sub) -> None:
    """Add this package's subcommands to the `ldm` parser."""
