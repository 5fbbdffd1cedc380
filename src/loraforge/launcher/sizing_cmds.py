"""Launcher commands (filled in by issue #7). Imports no torch."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register this module's subcommands on the `loraforge` parser."""
