"""`ltzoo` subcommands of the export package."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register this package's subcommands (filled in by its issue)."""
