"""Command-line entry: ``python -m lowrank_core <command> ...``.

Each command lives in ``lowrank_core/commands/<name>.py`` with ``register(subparsers)`` adding its
parser and setting ``func(args) -> int``. Tables go to stdout; with ``--json`` stdout holds exactly one
JSON object (strict JSON: never NaN or Infinity); progress bars, warnings and notes go to stderr.

A user error (:data:`USER_ERRORS`: lowrank's own error classes, a bad input file, a missing path, a
``ValueError`` raised by lowrank's own code) is printed as one line ``error: ...`` on stderr, exit
status 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path

import yaml
from safetensors import SafetensorError

from .allocate import BudgetError
from .arch import UnsupportedArchitectureError
from .data import ChatTemplateError, DataSourceError, describe_dropped
from .decompose import FactorizationError
from .evaluate import EvaluationError
from .export import ExportError
from .methods import MethodError
from .models import CacheDirError, ModelSourceError
from .options import OptionError
from .paths import OutputPathError
from .plan import PlanError
from .recipe import RecipeError
from .rescue import WriteFailed
from .student import StudentError

COMMANDS = ("count", "evaluate", "compare", "compress", "spectrum", "run", "search")
PACKAGE_DIR = Path(__file__).resolve().parent


class CliError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


# what a user can get wrong: the engine's error classes (each a ValueError naming the bad value and what is
# allowed), files that are missing, unreadable or malformed. A plain ValueError counts only when lowrank's
# own code raised it (``raised_by_lowrank``); one from torch, numpy or transformers is a bug.
USER_ERRORS = (CliError, PlanError, OptionError, RecipeError, DataSourceError, ModelSourceError, ExportError,
               MethodError, BudgetError, UnsupportedArchitectureError, FactorizationError, StudentError,
               OutputPathError, EvaluationError, WriteFailed, ChatTemplateError, CacheDirError, FileNotFoundError,
               NotADirectoryError, IsADirectoryError, PermissionError, json.JSONDecodeError, yaml.YAMLError,
               SafetensorError)


def raised_by_lowrank(error: BaseException) -> bool:
    """True when the innermost frame of ``error``'s traceback is in the ``lowrank_core`` package."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    filename = Path(tb.tb_frame.f_code.co_filename) if tb is not None else None
    return filename is not None and filename.is_absolute() and filename.resolve().is_relative_to(PACKAGE_DIR)


def is_user_error(error: BaseException) -> bool:
    return isinstance(error, USER_ERRORS) or (type(error) is ValueError and raised_by_lowrank(error))


def one_line(error: BaseException) -> str:
    """The error's message on one line (multi-line messages, e.g. YAML's, joined with ' | ')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " | ".join(lines) or type(error).__name__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lowrank_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"lowrank_core.commands.{name}").register(sub)
    return parser


def _non_finite(obj, path: str = ""):
    """(path, value) of the first NaN / infinite float in a JSON-ready structure, else None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return path or "the record", obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _non_finite(value, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def print_json(obj) -> None:
    """One strict JSON object on stdout; a NaN / infinite number is a ``CliError`` naming where it is."""
    try:
        text = json.dumps(obj, indent=2, default=str, allow_nan=False)
    except ValueError:
        path, value = _non_finite(obj) or ("the record", "NaN")
        raise CliError(f"the result holds {value} at {path}, which JSON cannot represent; the model's scores are "
                       "not finite numbers (check its weights and dtype)") from None
    sys.stdout.write(text + "\n")


def at_least(minimum: int, **flags) -> None:
    """``CliError`` naming the first flag (``max_len=`` -> ``--max-len``) whose value is below ``minimum``."""
    for name, value in flags.items():
        if value is not None and value < minimum:
            raise CliError(f"--{name.replace('_', '-')} {value} is not allowed; use an integer >= {minimum}")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def note_dropped(split_info: dict) -> None:
    """A stderr note of the records a split's source dropped, by reason (``SplitInfo.dropped``)."""
    text = describe_dropped(split_info.get("dropped") or {})
    if text:
        note(f"data source {split_info.get('source')!r}: {text}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a user error
        if not is_user_error(e):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
