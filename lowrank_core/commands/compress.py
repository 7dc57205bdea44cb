"""``compress``: build a student by a plan, report params, teacher/student answer loss and per-layer errors.

``run_compress_job(args)`` does the work and returns a dict (the CompressResult, the evaluation and a
JSON-ready summary) so that other commands (e.g. export) can reuse it.
"""
from __future__ import annotations

import time

from ..cli import print_json
from ..compress import CompressSettings, RefitSettings, compress
from ..data import iter_side, make_split
from ..evaluate import default_batch_size, evaluate_models
from ..models import DTYPES, load_model
from .. import methods
from ..plan import load_plan
from ..progress import TqdmProgress
from ..methods.refit import TARGETS
from ..table import format_table

LAYER_COLUMNS = ["name", "shape", "rank", "method", "params_after", "rel_error", "rel_error_fit"]


def add_compress_arguments(p) -> None:
    """The options that define a compression job (shared with commands built on top of compress)."""
    p.add_argument("--model", default="default", help="'default', model folder, .gguf, hub id or tiny")
    p.add_argument("--data", default="default",
                   help="'default' (ShareGPT), 'chatterbot', local .parquet/.jsonl/.json (OpenOrca columns) or hub id")
    p.add_argument("--plan", required=True, help="plan file (.yaml/.json) or compact string, e.g. 'all:k0.9'")
    p.add_argument("--method", default="whitened", choices=methods.names(), help="method for rules that name none")
    p.add_argument("--calib", type=int, default=64, help="calibration examples (calib side of the split)")
    p.add_argument("--eval", type=int, default=200, help="evaluation examples (eval side); 0 skips evaluation")
    p.add_argument("--max-len", type=int, default=512, help="tokens per example (prompt + answer)")
    p.add_argument("--batch-size", type=int, default=4, help="calibration batch size (sequences)")
    p.add_argument("--eval-batch-size", type=int, default=None, help="default: 1 on CPU, 8 on CUDA")
    p.add_argument("--layerwise", action="store_true",
                   help="sequential layer-by-layer path: Grams on the student's inputs, one layer at a time")
    p.add_argument("--valid-fraction", type=float, default=0.2,
                   help="share of calibration examples held out (errors, refit early stopping)")
    p.add_argument("--refit-steps", type=int, default=200, help="refit: Adam steps per decoder layer (at most)")
    p.add_argument("--refit-lr", type=float, default=1e-4)
    p.add_argument("--refit-batch-tokens", type=int, default=2048, help="refit: real tokens per step")
    p.add_argument("--refit-patience", type=int, default=3)
    p.add_argument("--refit-target", default="block", choices=TARGETS)
    p.add_argument("--refit-bias", action="store_true", help="refit: also train a bias on each factorised linear")
    p.add_argument("--seed", type=int, default=0, help="split seed (also the fit / held-out split)")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--offload", action="store_true", help="keep stored hidden states on CPU (big models)")
    p.add_argument("--layer-device", default=None,
                   help="compute device of the layer-by-layer path (e.g. cuda with --device cpu: one layer on "
                        "the GPU at a time, the 7B path); default: the model's device")


def register(sub) -> None:
    p = sub.add_parser("compress", help="compress a model by a plan and compare teacher and student")
    add_compress_arguments(p)
    add_export_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def settings_from_args(args) -> CompressSettings:
    refit = RefitSettings(steps=args.refit_steps, lr=args.refit_lr, batch_tokens=args.refit_batch_tokens,
                          valid_fraction=args.valid_fraction, patience=args.refit_patience,
                          target=args.refit_target, train_bias=args.refit_bias, seed=args.seed)
    settings = CompressSettings(method=args.method, calib=args.calib, max_len=args.max_len,
                                batch_size=args.batch_size, seed=args.seed, layerwise=args.layerwise,
                                refit=refit, offload=args.offload,
                                device=args.layer_device)
    settings.validate()
    return settings


def run_compress_job(args, progress=None) -> dict:
    """Load, split, compress, evaluate. Returns {"loaded", "split", "result", "evaluation", "summary"}:
    ``summary`` is the JSON-ready record the CLI prints (``evaluation``: {"teacher", "student"} EvalResults
    or {} with ``--eval 0``)."""
    if args.eval < 0:
        raise ValueError(f"--eval {args.eval} must be >= 0")
    settings = settings_from_args(args)
    plan = load_plan(args.plan)
    split = make_split(args.data, n_calib=args.calib, n_eval=0, seed=args.seed)
    # the eval side streamed lazily: the first --eval examples that fit --max-len are scored (as `evaluate --n`)
    eval_examples = iter_side(args.data, "eval", seed=args.seed)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    bar = progress or TqdmProgress("compress")
    try:
        result = compress(loaded.model, loaded.tokenizer, plan, split.calib, settings, progress=bar)
        evaluation = {}
        if args.eval:
            t0 = time.perf_counter()
            evaluation = evaluate_models({"teacher": loaded.model, "student": result.student}, loaded.tokenizer,
                                         eval_examples, n=args.eval,
                                         batch_size=args.eval_batch_size or default_batch_size(loaded.device),
                                         max_len=args.max_len, progress=bar)
            result.timings["evaluation"] = time.perf_counter() - t0
    finally:
        if hasattr(bar, "close"):
            bar.close()
    summary = {"model": loaded.name, "model_fingerprint": loaded.fingerprint, "data": args.data,
               "plan": plan.to_dict(), "method": args.method, "params_before": result.params_before,
               "params_after": result.params_after, "ratio": result.params_after / result.params_before,
               "teacher_loss": evaluation["teacher"].loss if evaluation else None,
               "student_loss": evaluation["student"].loss if evaluation else None,
               "evaluation": {k: v.to_dict() for k, v in evaluation.items()},
               "split_info": split.info.to_dict(), "dtype": args.dtype, "device": loaded.device,
               **result.to_dict()}
    return {"loaded": loaded, "split": split, "result": result, "evaluation": evaluation, "summary": summary}


def print_report(summary: dict) -> None:
    rows = summary["layers"]
    print(format_table(rows, [c for c in LAYER_COLUMNS if any(r.get(c) is not None for r in rows)]))
    if summary["hidden_mse"]:
        print()
        print(format_table(summary["hidden_mse"], ["layer", "mse", "rel_mse", "tokens"]))
    print()
    before, after = summary["params_before"], summary["params_after"]
    print(f"params before {before:>16,}")
    print(f"params after  {after:>16,}  ({after / before:.2%}, {before - after:,} removed)")
    if summary["teacher_loss"] is not None:
        ev = summary["evaluation"]["teacher"]
        t, s = summary["teacher_loss"], summary["student_loss"]
        print(f"teacher loss  {t:.4f}   student loss {s:.4f}   delta {s - t:+.4f} nats "
              f"({ev['examples']} eval examples, {ev['tokens']:,} answer tokens)")
    sp = summary["split"]
    print(f"calibration: {sp['fit_examples']} fit + {sp['held_out_examples']} held-out examples "
          f"({sp['fit_tokens']:,} + {sp['held_out_tokens']:,} tokens), {sp['path']} path")
    print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in summary["timings"].items()))


def run(args) -> int:
    check_export_arguments(args)
    job = run_compress_job(args)
    exported = export_job(args, job) if args.export else None
    if args.json:
        print_json(job["summary"])
    else:
        print_report(job["summary"])
        if exported is not None:
            print(f"export: {exported.format} -> {exported.path} ({exported.bytes_on_disk / 1e6:.1f} MB), verified, "
                  f"max |logit diff| {exported.max_logit_diff:.3g}")
    return 0


# ----------------------------------------------------------------------------- export (issue 5, export.py)
def add_export_arguments(p) -> None:
    p.add_argument("--export", metavar="DIR", help="write the student to DIR (reloaded and verified before it lands)")
    p.add_argument("--format", choices=("dense", "factorized"),
                   help="export format: dense (merged, plain transformers; default) or factorized (smaller)")
    p.add_argument("--force", action="store_true", help="replace an existing export at DIR")


def check_export_arguments(args) -> None:
    """Refuse bad export options before any work (an existing DIR without --force)."""
    from pathlib import Path

    from ..cli import CliError
    from ..export import check_target

    if not args.export:
        if args.format or args.force:
            raise CliError("--format and --force need --export DIR")
        return
    check_target(Path(args.export), args.force)


def export_job(args, job: dict):
    """Export the job's student with its manifest; adds export_dir, verified and export to the summary."""
    from ..export import build_manifest, export_student

    summary, evaluation = job["summary"], job["evaluation"]
    manifest = build_manifest(source=summary["model"], fingerprint=summary["model_fingerprint"],
                              plan=summary["plan"], method=args.method, settings=summary["settings"],
                              split=summary["split_info"], teacher_metrics=evaluation.get("teacher"),
                              student_metrics=evaluation.get("student"), layers=summary["layers"],
                              accounting={"original": summary["params_before"], "compressed": summary["params_after"]})
    bar = TqdmProgress("export")
    try:
        exported = export_student(job["result"].student, job["loaded"].tokenizer, args.export, args.format or "dense",
                                  manifest, force=args.force, eval_examples=job["split"].eval[:16] or None,
                                  progress=bar)
    finally:
        bar.close()
    summary.update(export_dir=exported.path, verified=exported.verified, export=exported.to_dict())
    return exported
