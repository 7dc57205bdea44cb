"""``compare``: the paired proof — teacher and students on the same held-out examples, with a verdict.

A student is an export folder (dense or factorized) or a plan (file or compact string), built from the
teacher with the compression flags on the calibration side of the same split. Evaluation examples are
streamed from the eval side (never seen by calibration); see ``lowrank_core/compare.py`` and
``stats.py`` for what is computed. Flags -> :class:`~lowrank_core.compare_job.CompareSpec` ->
:func:`~lowrank_core.compare_job.run_compare` -> print (and the per-example CSV).

Under ``torchrun --nproc_per_node N`` (or ``accelerate launch --multi_gpu --num_processes N``) the N
processes share the batches and report the one-process comparison; rank 0 alone prints and writes files
(``distributed.py``). ``--device-map`` spreads a teacher larger than a GPU over every GPU (one process).
"""
from __future__ import annotations

import argparse
import csv
import io

from .. import stats
from ..cli import at_least, note_dropped, print_json
from ..compare import CompareSettings
from ..compare_job import CompareResult, CompareSpec, run_compare
from ..compress import CompressSettings
from ..heal import HealSettings
from ..job import DataSpec, ModelSpec
from ..options import add_arguments, from_args
from ..paths import check_output_file
from ..plan import PlanOptions
from ..progress import TqdmProgress
from ..rescue import save_file
from ..table import format_table
from .evaluate import add_device_map_argument, in_launch


def register(sub) -> None:
    p = sub.add_parser("compare", help="paired teacher/student comparison on held-out data: Δloss with its "
                                       "interval, equivalence verdict, KL, top-1 agreement, worst examples")
    add_arguments(p, ModelSpec, "model")
    p.add_argument("--teacher", dest="model__source", default=argparse.SUPPRESS, metavar="SOURCE",
                   help="the teacher (= --model)")
    p.add_argument("--student", action="append", required=True,
                   help="an export folder or a plan (file or compact string, e.g. 'all:k0.8'); repeat to compare "
                        "several students on the same batches")
    p.add_argument("--data", default=DataSpec.source, help="data source (its eval side is scored)")
    p.add_argument("--seed", type=int, default=DataSpec.seed, help="split seed")
    p.add_argument("--calib", type=int, default=DataSpec.calib, help="calibration examples for plan students")
    add_arguments(p, CompareSettings, "compare")
    p.add_argument("--max-n", dest="compare__examples", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="the most examples --until-decided scores (= --n)")
    add_arguments(p, PlanOptions, "plan")  # applies to every plan student
    add_arguments(p, CompressSettings, "method")
    add_arguments(p, HealSettings, "heal", prefix="heal-")
    p.add_argument("--generate", type=int, default=0, metavar="K",
                   help="also generate greedy and sampled answers of teacher and student for K prompts")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per generated answer")
    p.add_argument("--per-example", default=None, metavar="CSV", help="write per-example rows to this CSV file")
    add_device_map_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def spec_from_args(args) -> CompareSpec:
    """The CompareSpec of the command line (nothing checked yet)."""
    return CompareSpec(students=list(args.student), model=from_args(ModelSpec, args, "model"),
                       data=DataSpec(source=args.data, seed=args.seed, calib=args.calib, eval=0),
                       compare=from_args(CompareSettings, args, "compare"), plan=from_args(PlanOptions, args, "plan"),
                       method=from_args(CompressSettings, args, "method"), heal=from_args(HealSettings, args, "heal"),
                       generate=args.generate, max_new_tokens=args.max_new_tokens, device_map=args.device_map)


def run(args) -> int:
    at_least(0, generate=args.generate, seed=args.seed)
    at_least(1, max_new_tokens=args.max_new_tokens, calib=args.calib)
    spec = spec_from_args(args)
    spec.validate()  # every student and option, before the launch is joined or any model loads
    if args.per_example is not None:
        check_output_file(args.per_example, "--per-example")
    return in_launch(spec.model.device, lambda rank, size: _run(args, spec, rank, size))


def _run(args, spec: CompareSpec, rank: int, size: int) -> int:
    bar = TqdmProgress("compare") if rank == 0 else None  # every rank scores its share; rank 0 alone reports
    try:
        result = run_compare(spec, progress=bar, world=(rank, size))
    finally:
        if bar is not None:
            bar.close()
    if rank != 0:
        return 0
    record = result.to_dict()
    note_dropped({"source": spec.data.source, "dropped": result.dropped})
    if args.per_example:
        _write_rows(args.per_example, result)
    if args.json:
        print_json(record)
    else:
        print_report(record)
    return 0


def _write_rows(path: str, result: CompareResult) -> None:
    """The per-example rows as CSV at ``path`` (atomically); on any failure kept in a rescue folder."""
    rows = [{"student": label, **row} for label, c in result.comparisons.items() for row in c.rows()]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["student"])
    writer.writeheader()
    writer.writerows(rows)
    data = text.getvalue()
    save_file(path, lambda p: p.write_text(data, newline=""), "the per-example rows", "compare",
              needed=len(data.encode()))


def print_report(record: dict) -> None:
    rows = []
    for r in record["students"]:
        rows.append({"student": r["student"][:40], "params": f"{r['params']:,}",
                     "kept": f"{r['params'] / r['teacher_params']:.2%}", "examples": r["examples"],
                     "tokens": r["tokens"], "teacher": f"{r['teacher_loss']:.4f}", "loss": f"{r['student_loss']:.4f}",
                     "Δloss": f"{r['delta']:+.4f}", f"{r['ci_level']:.0%} interval": stats.interval_text(r["delta_ci"]),
                     "p": stats.p_text(r["p_value"]), "KL": f"{r['kl']:.4f}", "top-1": f"{r['top1_agreement']:.2%}",
                     "verdict": r["verdict"], "decided": decided_text(r)})
    print(format_table(rows, list(rows[0])))
    for r in record["students"]:
        print()
        print(f"{r['student']}: {r['verdict_text']}")
        print(f"  procedure: {r['procedure']}; {decided_text(r)}")
        print(f"  perplexity teacher {r['teacher_perplexity']:.4f}, student {r['student_perplexity']:.4f}; "
              f"{r['skipped']} example(s) skipped (prompt filled --eval-max-len); {r['seconds']:.0f} s")
        worst = [{"Δ nats": f"{w['delta']:+.2f}", "Δ/token": f"{w['delta_per_token']:+.3f}", "tokens": w["tokens"],
                  "prompt": w["prompt"][:70]} for w in r["worst"][:5]]
        if worst:
            print(format_table(worst, list(worst[0])))
    for label, gens in record["generations"].items():
        for g in gens:
            print()
            where = "identical" if g["diverge"] is None else f"diverge at token {g['diverge']}"
            print(f"[{label} · {g['mode']} · {where}] {g['prompt'][:80]}")
            print(f"  teacher: {_one_line(g['teacher'])}")
            print(f"  student: {_one_line(g['student'])}")


def decided_text(summary: dict) -> str:
    """'decided after 60 examples' / 'undecided at the maximum' (an until-decided pass), else 'fixed N'."""
    seq = summary.get("sequential")
    if not seq:
        return f"fixed N = {summary['examples']}"
    if seq["decided"]:
        return f"decided after {seq['stopping_n']} examples"
    return "undecided at the maximum" if seq["stopping_n"] >= seq["max_n"] else f"undecided after {seq['stopping_n']}"


def _one_line(text: str, limit: int = 300) -> str:
    flat = text.replace("\n", "\\n")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
