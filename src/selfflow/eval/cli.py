"""Placeholder: the subcommand is registered here once it is built."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register nothing yet."""
