"""Command-line entry: ``python -m lowrank_core <command> ...``.

Each command lives in ``lowrank_core/commands/<name>.py`` with ``register(subparsers)`` adding its
parser and setting ``func(args) -> int``. Tables go to stdout; with ``--json`` stdout holds exactly one
JSON object; progress bars go to stderr.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

COMMANDS = ("count", "evaluate", "compare", "compress", "spectrum", "run", "search")


class CliError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lowrank_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"lowrank_core.commands.{name}").register(sub)
    return parser


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CliError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
