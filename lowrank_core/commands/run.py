"""``run``: run a whole compression job from a YAML recipe (``recipes/*.yaml``), or only account for it."""
from __future__ import annotations

import argparse
import sys

from ..cli import print_json
from ..progress import TqdmProgress
from ..recipe import load_recipe, run_recipe
from ..table import format_table


def register(sub) -> None:
    p = sub.add_parser("run", help="run a compression job from a YAML recipe (see recipes/)")
    p.add_argument("recipe", help="recipe file (.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the parameter accounting only (config, no weights)")
    p.add_argument("--export-dir", help="override export.dir (adds an export to a recipe without one)")
    p.add_argument("--format", choices=("dense", "factorized"), help="override export.format")
    p.add_argument("--force", action="store_true", help="replace an existing export folder")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in (("dir", args.export_dir), ("format", args.format), ("force", args.force or None))
                 if v is not None}
    recipe = load_recipe(args.recipe, export=overrides)
    if args.dry_run:
        from types import SimpleNamespace

        from . import count

        return count.run(SimpleNamespace(model=recipe.model["source"], plan=recipe.plan, json=args.json))
    bar = TqdmProgress(recipe.name)
    try:
        result = run_recipe(recipe, progress=bar, log=lambda message: print(f"[{recipe.name}] {message}",
                                                                           file=sys.stderr, flush=True))
    finally:
        bar.close()
    if args.json:
        print_json(result.to_dict())
        return 0
    print(summary(result))
    return 0


def summary(result) -> str:
    """The final human-readable report of a run."""
    t, s, acc = result.teacher, result.student, result.accounting
    rows = [{"model": name, "loss": f"{r['loss']:.4f}", "perplexity": f"{r['perplexity']:.4f}",
             "tokens": r["tokens"], "examples": r["examples"], "skipped": r.get("skipped", 0)}
            for name, r in (("teacher", t), ("student", s))]
    lines = [f"recipe {result.recipe['name']}: {len(acc['matrices'])} matrices replaced",
             format_table(rows, ["model", "loss", "perplexity", "tokens", "examples", "skipped"]),
             f"loss change  {s['loss'] - t['loss']:+.4f}",
             f"parameters   {acc['original']:,} -> {acc['compressed']:,} ({acc['ratio']:.2%})"]
    if result.export is not None:
        x = result.export
        check = f"verified, max |logit diff| {x.max_logit_diff:.3g}" if x.verified else "not verified"
        if x.reload_loss is not None:
            check += f", reload loss {x.reload_loss:.4f} (student {x.student_loss:.4f} on the same examples)"
        lines.append(f"export       {x.format} -> {x.path}: {x.bytes_on_disk / 1e6:.1f} MB on disk "
                     f"({x.weight_bytes / 1e6:.1f} MB weights), {x.parameters:,} parameters stored; {check}")
    lines.append("seconds      " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
    return "\n".join(lines)
