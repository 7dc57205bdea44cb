"""``search``: per-matrix ranks under a loss budget (or a parameter target), verified on a validation split.

The validation split is carved from the calibration side of the honest split; the evaluation split is
scored once, at the end, for the teacher and the found student. ``--out plan.yaml`` saves the plan so
that ``compress --plan plan.yaml`` (same ``--calib``/``--max-len``/``--batch-size``/``--seed``) rebuilds
the same student.
"""
from __future__ import annotations

import time
from pathlib import Path
from dataclasses import replace

from ..allocate import (DEFAULT_KEEPS, GRADIENT_SCORES, PROBES, VAL_OVERDRAW, SearchSettings, allocate,
                        fitting_examples, search_goal)
from ..archmap import meta_model
from ..cli import CliError, at_least, note_dropped, print_json
from ..compress import CompressSettings
from ..data import make_split
from ..evaluate import default_batch_size, evaluate_models
from ..job import DataSpec, EvalSpec, ModelSpec, rescue_dir
from ..models import load_config, load_model, refuse_factorized
from ..heal import HealSettings
from ..options import add_arguments, checked, from_args
from ..paths import check_output_file
from ..progress import TqdmProgress
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
    p.set_defaults(data__val=32)
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
    p.add_argument("--eval-batch-size", type=int, default=EvalSpec.batch_size,
                   help="default: 1 on CPU, 8 on CUDA")
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


def run(args) -> int:
    start = time.perf_counter()
    # a few times more validation-side examples than asked: long prompts do not fit --val-max-len
    m, d = from_args(ModelSpec, args, "model"), from_args(DataSpec, args, "data")
    if d.val < 1 or d.eval < 1:
        raise CliError(f"--val {d.val} and --eval {d.eval} must be at least 1: the search is verified on validation "
                       "examples and its plan scored on evaluation examples")
    at_least(1, eval_batch_size=args.eval_batch_size)
    if args.out is not None:
        check_output_file(args.out, "--out", suffixes=(".yaml", ".yml", ".json"))
    refuse_factorized(m.source)
    settings = SearchSettings(keeps=_floats(args.keeps), probe_keep=args.probe_keep, probe=args.probe,
                              gradient_score=args.gradient_score,
                              val_max_len=args.val_max_len, max_verify=args.max_verify, refit=args.refit,
                              compression=CompressSettings(calib=d.calib, max_len=args.max_len,
                                                           batch_size=args.batch_size, seed=d.seed),
                              heal=replace(from_args(HealSettings, args, "heal"), seed=d.seed))
    checked("search", settings.validate)  # bad options fail here, before any weight is loaded
    goal = dict(budget=args.budget, keep_params=args.keep_params, target_params=args.target_params,
                modules=settings.modules)
    search_goal(meta_model(load_config(m.source)), **goal)  # so does a bad goal (the config is enough)
    split = make_split(d.source, n_calib=d.calib, n_eval=d.eval, n_val=VAL_OVERDRAW * d.val, seed=d.seed)
    loaded = load_model(m.source, dtype=m.dtype, device=m.device)
    val = fitting_examples(loaded.tokenizer, split.val, d.val, args.val_max_len)
    if not val:
        raise CliError(f"no validation example fits --val-max-len {args.val_max_len}; raise it")
    budget, target = search_goal(loaded.model, **goal)
    bar = TqdmProgress("search")
    try:
        result = allocate(loaded.model, loaded.tokenizer, split.calib, val, budget=budget,
                          target_params=target, settings=settings, progress=bar)
        scores = evaluate_models({"teacher": loaded.model, "student": result.student}, loaded.tokenizer,
                                 split.eval, batch_size=args.eval_batch_size or default_batch_size(loaded.device),
                                 max_len=args.max_len, progress=bar)
    finally:
        bar.close()
    note_dropped(split.info.to_dict())
    if args.out:
        try:
            result.plan.save(args.out)
        except OSError as e:  # the folder vanished or became read-only during the search: keep the plan
            rescue = rescue_dir("search").with_suffix(Path(args.out).suffix)
            rescue.parent.mkdir(parents=True, exist_ok=True)
            result.plan.save(rescue)
            raise CliError(f"saving the plan to {args.out} failed ({e}); it was saved to {rescue} instead") from e
    record = {"model": loaded.name, "data": d.source, "budget_arg": budget, **result.to_dict(),
              "teacher_val_loss": result.teacher_loss,
              "teacher_loss": scores["teacher"].loss, "eval_loss": scores["student"].loss,
              "eval_delta": scores["student"].loss - scores["teacher"].loss, "eval_examples": scores["student"].examples,
              "eval_tokens": scores["student"].tokens, "split": split.info.to_dict(), "out": args.out,
              "seconds": time.perf_counter() - start}
    if args.json:
        print_json(record)
        return 0
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
          f"Δ {record['eval_delta']:+.4f}  ({record['eval_examples']} examples)")
    if args.out:
        print(f"plan saved to {args.out}")
    print(f"{record['seconds']:.1f} s")
    return 0
