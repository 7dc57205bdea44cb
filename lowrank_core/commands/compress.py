"""``compress``: run one job (build a student by a plan, compare teacher and student, optionally export).

Every flag is derived from the :class:`~lowrank_core.job.JobSpec` dataclasses (``options.py``): the
defaults live there only. ``--json`` prints the :meth:`JobResult.to_dict` record plus ``warnings``: the
plan's accounting warnings (printed on stderr before any work), then the calibration's (too few fit tokens
for a Gram's inputs, a tiny held-out set: ``compress.calibration_warnings``, printed on stderr after the job).
"""
from __future__ import annotations

from ..cli import CliError, note_dropped, print_json, warn
from ..compress import CompressSettings
from ..evaluate import check_finite_loss
from ..heal import HealSettings
from ..job import DataSpec, EvalSpec, ExportSpec, JobSpec, JobResult, ModelSpec, dry_run, run_job
from ..options import add_arguments, from_args, given
from ..plan import PlanOptions, check_replaces_something
from ..progress import TqdmProgress
from ..table import format_table

LAYER_COLUMNS = ["name", "shape", "rank", "method", "params_after", "rel_error", "rel_error_fit"]


def add_job_arguments(p) -> None:
    """The flags of a job: model, data, plan, method settings, evaluation, export (all from the specs)."""
    add_arguments(p, ModelSpec, "model")
    add_arguments(p, DataSpec, "data")
    p.add_argument("--plan", required=True, help="plan file (.yaml/.json) or compact string, e.g. 'all:k0.9'")
    add_arguments(p, PlanOptions, "plan")
    add_arguments(p, CompressSettings, "method")
    add_arguments(p, HealSettings, "heal", prefix="heal-")
    add_arguments(p, EvalSpec, "evaluate", prefix="eval-")
    add_arguments(p, ExportSpec, "export", optional=True)


def job_from_args(args) -> JobSpec:
    """The JobSpec of parsed flags; export flags without ``--export DIR`` are an error."""
    export = None
    if hasattr(args, "export__dir"):
        export = from_args(ExportSpec, args, "export")
    elif given(ExportSpec, args, "export"):
        raise CliError(f"export options {', '.join(given(ExportSpec, args, 'export'))} need --export DIR")
    spec = JobSpec(plan=from_args(PlanOptions, args, "plan").apply(args.plan),
                   model=from_args(ModelSpec, args, "model"), data=from_args(DataSpec, args, "data"),
                   method=from_args(CompressSettings, args, "method"), heal=from_args(HealSettings, args, "heal"),
                   evaluate=from_args(EvalSpec, args, "evaluate"),
                   export=export, name="compress")
    spec.validate()
    return spec


def preflight(spec: JobSpec) -> list[str]:
    """Every check before any work: the spec's (``JobSpec.validate``), then the plan's accounting from the
    model's config alone (no weights): a plan that replaces no matrix fails here; its warnings (ranks above
    break-even, a tied lm_head: what ``count`` prints) go to stderr and are returned."""
    spec.validate()
    accounting = dry_run(spec)
    check_replaces_something(spec.plan, accounting.rows)
    for message in accounting.warnings:
        warn(message)
    return accounting.warnings


def job_record(result: JobResult) -> dict:
    """``JobResult.to_dict()`` with ``warnings`` (the plan's, then the calibration's); refuses scores that are not finite numbers and
    notes the records the data source dropped."""
    record = result.to_dict()
    for side in ("teacher", "student"):
        if record[side] is not None:
            check_finite_loss(record[side]["loss"], side, f"{record[side]['examples']} evaluation examples")
    record["warnings"] = list(result.accounting.warnings) + list(result.compressed.warnings)
    note_dropped(record["split"])
    return record


def register(sub) -> None:
    p = sub.add_parser("compress", help="compress a model by a plan and compare teacher and student")
    add_job_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def print_report(record: dict) -> None:
    c = record["compress"]
    rows = c["layers"]
    print(format_table(rows, [col for col in LAYER_COLUMNS if any(r.get(col) is not None for r in rows)]))
    if c["hidden_mse"]:
        print()
        print(format_table(c["hidden_mse"], ["layer", "mse", "rel_mse", "tokens"]))
    print()
    before, after = record["params_before"], record["params_after"]
    print(f"params before {before:>16,}")
    print(f"params after  {after:>16,}  ({after / before:.2%}, {before - after:,} removed)")
    if record["teacher"] is not None:
        t, s = record["teacher"], record["student"]
        print(f"teacher loss  {t['loss']:.4f}   student loss {s['loss']:.4f}   delta {s['loss'] - t['loss']:+.4f} nats "
              f"({t['examples']} eval examples, {t['tokens']:,} answer tokens)")
        if record.get("comparison"):
            print(record["comparison"]["verdict_text"])
    h = record["heal"]
    if h is not None:
        print(f"healing: {h['tokens']:,} tokens, {h['steps']} steps, validation {h['settings']['loss']} "
              f"{h['initial_valid']:.4f} -> {h['best_valid']:.4f} ({h['seconds']:.0f} s)")
    sp = c["split"]
    print(f"calibration: {sp['fit_examples']} fit + {sp['held_out_examples']} held-out examples "
          f"({sp['fit_tokens']:,} + {sp['held_out_tokens']:,} tokens), {sp['path']} path")
    x = record["export"]
    if x is not None:
        print(f"export: {x['format']} -> {x['path']} ({x['bytes_on_disk'] / 1e6:.1f} MB), "
              + (f"verified, max |logit diff| {x['max_logit_diff']:.3g}" if x["verified"] else "not verified"))
    print("compress: " + ", ".join(f"{k} {v:.1f}s" for k, v in c["timings"].items()))
    print("job:      " + ", ".join(f"{k} {v:.1f}s" for k, v in record["seconds"].items()))


def run(args) -> int:
    spec = job_from_args(args)
    preflight(spec)
    bar = TqdmProgress("compress")
    try:
        result = run_job(spec, progress=bar)
    finally:
        bar.close()
    record = job_record(result)
    for message in result.compressed.warnings:  # after the bar: a closed bar cannot overwrite them
        warn(message)
    if args.json:
        print_json(record)
    else:
        print_report(record)
    return 0
