"""``run``: run a whole job from a YAML recipe (``recipes/*.yaml``), or only account for it."""
from __future__ import annotations

import argparse
import sys

from ..cli import print_json
from ..export import FORMATS
from ..job import dry_run, run_job
from ..options import add_arguments, from_args
from ..plan import PlanOptions
from ..progress import TqdmProgress
from ..recipe import load_recipe
from ..table import format_table
from .compress import job_record, preflight
from .count import print_accounting


def register(sub) -> None:
    p = sub.add_parser("run", help="run a compression job from a YAML recipe (see recipes/)")
    p.add_argument("recipe", help="recipe file (.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the parameter accounting only (config, no weights)")
    p.add_argument("--export-dir", help="override export.dir (adds an export to a recipe without one)")
    p.add_argument("--format", choices=FORMATS, help="override export.format")
    p.add_argument("--force", action="store_true", help="replace an existing export folder")
    add_arguments(p, PlanOptions, "plan")  # overrides the recipe plan's rank_multiple
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in (("dir", args.export_dir), ("format", args.format), ("force", args.force or None))
                 if v is not None}
    spec = load_recipe(args.recipe, export=overrides)
    spec.plan = from_args(PlanOptions, args, "plan").apply(spec.plan)
    if args.dry_run:
        acc = dry_run(spec)
        if args.json:
            print_json({"model": spec.model.source, **acc.to_dict()})
        else:
            print_accounting(acc)
        return 0
    preflight(spec)
    bar = TqdmProgress(spec.name)
    try:
        result = run_job(spec, progress=bar, log=lambda message: print(f"[{spec.name}] {message}",
                                                                       file=sys.stderr, flush=True))
    finally:
        bar.close()
    record = job_record(result)
    if args.json:
        print_json(record)
        return 0
    print(summary(record))
    return 0


def summary(record: dict) -> str:
    """The final human-readable report of a run."""
    t, s, acc = record["teacher"], record["student"], record["accounting"]
    lines = [f"recipe {record['name']}: {len(acc['matrices'])} matrices replaced"]
    if t is not None:
        rows = [{"model": name, "loss": f"{r['loss']:.4f}", "perplexity": f"{r['perplexity']:.4f}",
                 "tokens": r["tokens"], "examples": r["examples"], "skipped": r.get("skipped", 0)}
                for name, r in (("teacher", t), ("student", s))]
        lines += [format_table(rows, ["model", "loss", "perplexity", "tokens", "examples", "skipped"]),
                  f"loss change  {s['loss'] - t['loss']:+.4f}"]
        if record.get("comparison"):
            lines.append(f"verdict      {record['comparison']['verdict_text']}")
    lines.append(f"parameters   {acc['original']:,} -> {acc['compressed']:,} ({acc['ratio']:.2%})")
    x = record["export"]
    if x is not None:
        check = f"verified, max |logit diff| {x['max_logit_diff']:.3g}" if x["verified"] else "not verified"
        if x["reload_loss"] is not None:
            check += f", reload loss {x['reload_loss']:.4f} (student {x['student_loss']:.4f} on the same examples)"
        lines.append(f"export       {x['format']} -> {x['path']}: {x['bytes_on_disk'] / 1e6:.1f} MB on disk "
                     f"({x['weight_bytes'] / 1e6:.1f} MB weights), {x['parameters']:,} parameters stored; {check}")
    lines.append("seconds      " + ", ".join(f"{k} {v:.1f}" for k, v in record["seconds"].items()))
    return "\n".join(lines)
