"""``count``: exact parameter accounting of a plan from a model's config alone (no weights)."""
from __future__ import annotations

from ..cli import print_json
from ..models import load_config
from ..options import add_arguments, from_args
from ..plan import PlanOptions, account
from ..table import format_table


def register(sub) -> None:
    p = sub.add_parser("count", help="parameter accounting of a plan, from the config alone")
    p.add_argument("--model", default="default", help="config.json, model folder, .gguf, hub id or 'default'")
    p.add_argument("--plan", required=True, help="plan file (.yaml/.json) or compact string, e.g. '6-31:attn:r16'")
    add_arguments(p, PlanOptions, "plan")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def run(args) -> int:
    acc = account(load_config(args.model), from_args(PlanOptions, args, "plan").apply(args.plan))
    if args.json:
        print_json({"model": args.model, **acc.to_dict()})
        return 0
    print_accounting(acc)
    return 0


def print_accounting(acc) -> None:
    """The per-matrix table, totals and warnings of an ``Accounting``."""
    cols = ["name", "shape", "rank", "break_even_rank", "params_before", "params_after", "rule"]
    if any(r["planned_rank"] != r["rank"] for r in acc.rows):  # the plan's rank rounding changed some
        cols.insert(3, "planned_rank")
    print(format_table(acc.rows, cols))
    print()
    print(f"original   {acc.original:>16,}")
    print(f"compressed {acc.compressed:>16,}  ({acc.ratio:.2%} of original, {acc.removed:,} removed)")
    for w in acc.warnings:
        print(f"warning: {w}")
