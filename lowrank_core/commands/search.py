"""``search``: per-matrix ranks under a loss budget (or a parameter target), verified on a validation split.

Flags -> :class:`~lowrank_core.search_job.SearchSpec` -> :func:`~lowrank_core.search_job.run_search` (the
Search page runs the same) -> print. The validation split is carved from the calibration side of the honest
split; the evaluation split is scored once, at the end: the teacher and the found student paired on the
same examples (Δ with its interval and verdict, as ``compare`` reports). ``--out plan.yaml`` saves the plan so
that ``compress --plan plan.yaml`` (same ``--calib``/``--max-len``/``--batch-size``/``--seed``) rebuilds
the same student.
"""
from __future__ import annotations


from .. import stats
from ..allocate import DEFAULT_KEEPS, GRADIENT_SCORES, PROBES, SearchSettings
from ..cli import CliError, note_dropped, print_json
from ..compress import CompressSettings
from ..heal import HealSettings
from ..job import DataSpec, EvalSpec, ModelSpec
from ..options import add_arguments, from_args
from ..paths import check_output_file
from ..progress import TqdmProgress
from ..rescue import save_file
from ..search_job import DEFAULT_VAL, SearchResult, SearchSpec, run_search
from ..table import format_table


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CliError(f"bad --keeps {text!r}; use comma-separated fractions, e.g. 0.9,0.8,0.5") from None


def register(sub) -> None:
    p = sub.add_parser("search", help="rank allocation under a loss budget, verified on a validation split")
    add_arguments(p, ModelSpec, "model")
    add_arguments(p, DataSpec, "data")
    # a search needs a validation split (carved from the calibration side): DataSpec's default is none
    p.set_defaults(data__val=DEFAULT_VAL)
    target = p.add_mutually_exclusive_group()
    target.add_argument("--budget", default=None,
                        help="allowed Δ validation loss: nats (0.02) or percent of the teacher loss ('1%%'); default 1%%")
    target.add_argument("--keep-params", type=float, default=None,
                        help="parameter target instead: keep this fraction of the eligible linears' parameters")
    target.add_argument("--target-params", type=int, default=None, help="parameter target: total parameters after")
    p.add_argument("--max-len", type=int, default=CompressSettings.max_len,
                   help="tokens per calibration / evaluation example")
    p.add_argument("--val-max-len", type=int, default=256, help="tokens per validation example")
    p.add_argument("--batch-size", type=int, default=CompressSettings.batch_size,
                   help="calibration batch size (as in compress)")
    add_arguments(p, EvalSpec, "evaluate", prefix="eval-")  # the paired comparison of the found plan
    p.add_argument("--probe", default="layer", choices=PROBES,
                   help="sensitivity: 'layer' (one suffix pass per decoder layer), 'matrix' (one per matrix) or "
                        "'gradient' (one backward pass per validation example scores every singular component)")
    p.add_argument("--gradient-score", default=SearchSettings.gradient_score, choices=GRADIENT_SCORES,
                   help="with --probe gradient: 'taylor' (|first order| + Fisher term) or 'fisher' (Fisher term only)")
    p.add_argument("--probe-keep", type=float, default=0.5, help="keep fraction of the probe rank")
    p.add_argument("--keeps", default=",".join(str(k) for k in DEFAULT_KEEPS), help="candidate keep fractions")
    p.add_argument("--max-verify", type=int, default=8, help="validation passes spent verifying the budget")
    p.add_argument("--refit", action="store_true", help="final stage: refit the found plan, keep it if better")
    add_arguments(p, HealSettings, "heal", prefix="heal-")  # healing in the loop: each verified student healed
    p.add_argument("--out", default=None, help="save the plan (.yaml or .json)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def spec_from_args(args) -> SearchSpec:
    """The SearchSpec of the command line (nothing checked yet: :func:`run_search` checks it first)."""
    return SearchSpec(model=from_args(ModelSpec, args, "model"), data=from_args(DataSpec, args, "data"),
                      search=SearchSettings(keeps=tuple(_floats(args.keeps)), probe_keep=args.probe_keep, probe=args.probe,
                                            gradient_score=args.gradient_score, val_max_len=args.val_max_len,
                                            max_verify=args.max_verify, refit=args.refit,
                                            compression=CompressSettings(max_len=args.max_len,
                                                                         batch_size=args.batch_size),
                                            heal=from_args(HealSettings, args, "heal")),
                      budget=args.budget, keep_params=args.keep_params, target_params=args.target_params,
                      evaluate=from_args(EvalSpec, args, "evaluate"), name="search")


def run(args) -> int:
    spec = spec_from_args(args)
    spec.validate()  # bad options and a bad goal fail here, before any example is read or weight loaded
    if args.out is not None:
        check_output_file(args.out, "--out", suffixes=(".yaml", ".yml", ".json"))
    bar = TqdmProgress("search")
    try:
        found = run_search(spec, progress=bar)
    finally:
        bar.close()
    note_dropped(found.split.info.to_dict())
    if args.out:
        _save(found, args.out)
    record = {**found.to_dict(), "out": args.out}
    if args.json:
        print_json(record)
        return 0
    print_report(found, record)
    return 0


def _save(found: SearchResult, out: str) -> None:
    """The plan at ``out`` (atomically); on any failure it is kept in a rescue folder named in the error."""
    plan = found.allocation.plan
    save_file(out, plan.save, "the plan", "search", needed=len(plan.to_yaml().encode()))


def print_report(found: SearchResult, record: dict) -> None:
    result, c = found.allocation, found.comparison.summary()
    print(format_table(result.pareto, ["steps", "params", "removed", "predicted_loss", "val_loss", "verified"]))
    print()
    goal = f"budget {result.budget:.4f} nats" if result.budget is not None else f"target {result.target_params:,} params"
    print(f"{goal}: {result.removed:,} of {result.params_before:,} parameters removed "
          f"({result.params_after / result.params_before:.2%} kept), {len(result.ranks)} matrices factorised, "
          f"method {result.method}")
    print(f"validation loss  teacher {result.teacher_loss:.4f}  student {result.val_loss:.4f}  "
          f"Δ {result.val_loss - result.teacher_loss:+.4f}  ({result.val_examples} examples, "
          f"{result.val_tokens} answer tokens)")
    print(f"evaluation loss  teacher {record['teacher_loss']:.4f}  student {record['eval_loss']:.4f}  "
          f"Δ {c['delta']:+.4f}  {c['ci_level']:.0%} interval {stats.interval_text(c['delta_ci'])}  ({record['eval_examples']} "
          f"examples, paired)")
    print(f"verdict: {c['verdict_text']}")
    if record["out"]:
        print(f"plan saved to {record['out']}")
    print(f"{record['seconds']:.1f} s")
