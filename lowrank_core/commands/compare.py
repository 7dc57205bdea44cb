"""``compare``: the paired proof — teacher and students on the same held-out examples, with a verdict.

A student is an export folder (dense or factorized) or a plan (file or compact string), built from the
teacher with the compression flags on the calibration side of the same split. Evaluation examples are
streamed from the eval side (never seen by calibration); see ``lowrank_core/compare.py`` and
``stats.py`` for what is computed.

Under ``torchrun --nproc_per_node N`` (or ``accelerate launch --multi_gpu --num_processes N``) the N
processes share the batches and report the one-process comparison; rank 0 alone prints and writes files
(``distributed.py``). ``--device-map`` spreads a teacher larger than a GPU over every GPU (one process).
"""
from __future__ import annotations

import argparse
import csv
import itertools
from pathlib import Path

from .. import distributed
from ..archmap import count_parameters
from ..cli import CliError, at_least, note_dropped, print_json
from ..compare import CompareSettings, compare_models
from ..compress import CompressSettings
from ..data import iter_side, make_split
from ..generate import side_by_side
from ..heal import HealSettings
from ..job import DataSpec, JobSpec, ModelSpec, run_job
from ..models import load_model
from ..options import add_arguments, checked, from_args, to_mapping
from ..paths import check_output_file
from ..plan import PlanOptions, load_plan
from ..progress import TqdmProgress
from ..table import format_table
from .evaluate import add_device_map_argument, check_device_map_flag, in_launch


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


def _student_kinds(values: list[str], options: PlanOptions = PlanOptions()) -> dict:
    """{label: "folder" | Plan}: every student checked before any model loads (``options`` applied to every
    plan)."""
    kinds = {}
    for value in values:
        if value in kinds or value == "teacher":
            raise CliError(f"--student {value!r} is given twice or named 'teacher'; each student once")
        path = Path(value).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise CliError(f"--student {value!r} is a folder without config.json; pass an export folder or a plan")
            kinds[value] = "folder"
        else:
            kinds[value] = options.apply(load_plan(value))
    return kinds


def run(args) -> int:
    settings = from_args(CompareSettings, args, "compare")
    checked("compare", settings.validate)
    at_least(0, generate=args.generate, seed=args.seed)
    at_least(1, max_new_tokens=args.max_new_tokens, calib=args.calib)
    if args.per_example is not None:
        check_output_file(args.per_example, "--per-example")
    kinds = _student_kinds(args.student, from_args(PlanOptions, args, "plan"))
    m = from_args(ModelSpec, args, "model")
    check_device_map_flag(args.device_map, m.device)
    data = DataSpec(source=args.data, seed=args.seed, calib=args.calib, eval=0)
    jobs = {label: JobSpec(plan=plan, model=m, data=data, method=from_args(CompressSettings, args, "method"),
                           heal=from_args(HealSettings, args, "heal"), name=f"compare:{label}")
            for label, plan in kinds.items() if plan != "folder"}
    for spec in jobs.values():
        spec.validate()
    return in_launch(m.device, lambda rank, size: _run(args, settings, kinds, m, jobs, rank, size))


def _run(args, settings: CompareSettings, kinds: dict, m: ModelSpec, jobs: dict, rank: int, size: int) -> int:
    check_device_map_flag(args.device_map, m.device, size)
    split = make_split(args.data, n_calib=max(spec.calib_examples for spec in jobs.values()), n_eval=0,
                       seed=args.seed) if jobs else None
    dropped: dict = {}  # records of the source that gave no example, by reason (filled while streaming)
    examples = iter_side(args.data, "eval", seed=args.seed, dropped=dropped)  # streamed: memory stays flat
    device = str(distributed.rank_device(m.device)) if size > 1 else m.device
    teacher = load_model(m.source, dtype=m.dtype, device=device, device_map=args.device_map)
    bar = TqdmProgress("compare") if rank == 0 else None  # every rank scores its share; rank 0 alone reports
    try:
        students = {}
        for label, kind in kinds.items():
            if kind == "folder":
                students[label] = load_model(label, dtype=m.dtype, device=teacher.device if args.device_map is None
                                             else "auto", device_map=args.device_map).model
            else:  # every rank builds the student from the same calibration examples
                students[label] = run_job(jobs[label], progress=bar, loaded=teacher, split=split, evaluate=False,
                                          export=False).student
        results = compare_models(teacher.model, students, teacher.tokenizer, examples, settings, progress=bar)
        generations = {}
        if args.generate and rank == 0:
            eval_few = list(itertools.islice(iter_side(args.data, "eval", seed=args.seed), args.generate))
            for label, student in students.items():
                generations[label] = [g.to_dict() for g in side_by_side(
                    teacher.model, student, teacher.tokenizer, eval_few, k=args.generate,
                    max_new_tokens=args.max_new_tokens, seed=settings.seed, progress=bar)]
    finally:
        if bar is not None:
            bar.close()
    if rank != 0:
        return 0
    record = {"teacher": teacher.name, "teacher_fingerprint": teacher.fingerprint, "data": args.data,
              "seed": args.seed, "settings": to_mapping(settings),
              "students": [{"student": label, "params": count_parameters(students[label]),
                            "teacher_params": count_parameters(teacher.model), **results[label].summary()}
                           for label in kinds],
              "generations": generations, "dropped": dict(sorted(dropped.items()))}
    if args.device_map is not None:
        record["device_map"] = args.device_map
    if size > 1:
        record["processes"] = size
    note_dropped({"source": args.data, "dropped": dropped})
    if args.per_example:
        _write_rows(args.per_example, results)
    if args.json:
        print_json(record)
    else:
        print_report(record)
    return 0


def _write_rows(path: str, results: dict) -> None:
    rows = [{"student": label, **row} for label, result in results.items() for row in result.rows()]
    with open(Path(path).expanduser(), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["student"])
        writer.writeheader()
        writer.writerows(rows)


def print_report(record: dict) -> None:
    rows = []
    for r in record["students"]:
        lo, hi = r["delta_ci"]
        rows.append({"student": r["student"][:40], "params": f"{r['params']:,}",
                     "kept": f"{r['params'] / r['teacher_params']:.2%}", "examples": r["examples"],
                     "tokens": r["tokens"], "teacher": f"{r['teacher_loss']:.4f}", "loss": f"{r['student_loss']:.4f}",
                     "Δloss": f"{r['delta']:+.4f}", f"{r['ci_level']:.0%} interval": f"[{lo:+.4f}, {hi:+.4f}]",
                     "p": f"{r['p_value']:.2g}" if r["p_value"] >= 1e-15 else "<1e-15", "KL": f"{r['kl']:.4f}", "top-1": f"{r['top1_agreement']:.2%}",
                     "verdict": r["verdict"]})
    print(format_table(rows, list(rows[0])))
    for r in record["students"]:
        print()
        print(f"{r['student']}: {r['verdict_text']}")
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


def _one_line(text: str, limit: int = 300) -> str:
    flat = text.replace("\n", "\\n")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
