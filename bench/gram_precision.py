"""How much does the dtype of the calibration Gram products matter? float64 (reference) vs float32 vs bfloat16.

    python bench/gram_precision.py                                  # embedded model, 64 calib, 100 eval
    python bench/gram_precision.py --model tiny --calib 4 --eval 8  # smoke run (seconds)
    python bench/gram_precision.py --json                           # one JSON object

For the model (``--model``, default the embedded one) and the first ``--calib`` calibration examples of the
honest split (``lowrank_core.data.make_split(...).calib``, cut to ``--max-len`` tokens, batched as
``compress`` does with ``calibration_batches``), the input Grams of every decoder linear are collected with
``lowrank_core.calibrate.collect_grams(..., precision=P)`` for P in float64 (the reference), float32 and
bfloat16 (products in that dtype, sums always float64). For each P it prints

- the wall seconds of the collection (best of ``--repeats``; on CPUs without bf16 matrix units — AVX2 —
  bf16 products are slower than float32, not faster: the timings measure that);
- the relative Frobenius error ``‖G_P − G_64‖ / ‖G_64‖`` of each Gram, max and median over the Grams;
- for every decoder linear, the whitened truncation error at keep 0.8 (``whitened_factors(W, G_P, rank)``,
  rank ``plan.rank_for_keep(info, 0.8)``) measured with the float64 Gram as the yardstick
  (``relative_output_error(W, W_hat, G_64)``, on the calibration tokens): max and mean relative change
  ``|e_P − e_64| / e_64`` against the float64-derived factors' error, and the mean error itself;
- the effect on the student: a student built from the factors of each P (``build_student`` with
  ``LowRankLinear.from_factors``) and the teacher scored by ``lowrank_core.evaluate.evaluate`` (answer loss)
  on the first ``--eval`` examples of the *evaluation* side of the split (never calibration data), with
  Δloss against the float64 student.

It also prints the load average and the torch thread count (timings on a shared machine move with both).
A script that measures and prints, not a test.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowrank_core.linears import linear_map  # noqa: E402
from lowrank_core.calibrate import collect_grams  # noqa: E402
from lowrank_core.data import calibration_batches, make_split  # noqa: E402
from lowrank_core.decompose import FactorizationError, relative_output_error, whitened_factors, whitening  # noqa: E402
from lowrank_core.evaluate import default_batch_size, evaluate  # noqa: E402
from lowrank_core.lowrank import LowRankLinear  # noqa: E402
from lowrank_core.models import load_model  # noqa: E402
from lowrank_core.plan import rank_for_keep  # noqa: E402
from lowrank_core.student import build_student  # noqa: E402
from lowrank_core.threads import configure_threads  # noqa: E402

PRECISIONS = ("float64", "float32", "bfloat16")   # the first is the reference


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="model source (default: the embedded model; tiny: a toy)")
    p.add_argument("--data", default="default", help="data source of the split")
    p.add_argument("--calib", type=int, default=64, help="calibration examples (calib side)")
    p.add_argument("--eval", type=int, default=100, help="held-out examples scored (eval side)")
    p.add_argument("--max-len", type=int, default=512, help="tokens per example, calibration and evaluation")
    p.add_argument("--batch-size", type=int, default=4, help="calibration batch size (as compress)")
    p.add_argument("--eval-batch-size", type=int, default=None, help="default: 1 on CPU, 8 on CUDA")
    p.add_argument("--keep", type=float, default=0.8, help="keep fraction of every decoder linear")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the project's load-aware count)")
    p.add_argument("--repeats", type=int, default=1, help="collections per precision; the best time is reported")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def relative_frobenius(a: torch.Tensor, ref: torch.Tensor) -> float:
    den = float(ref.norm())
    return float((a - ref).norm()) / den if den > 0 else float(a.norm() > 0)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        configure_threads(1, args.device)
    loaded = load_model(args.model, dtype="float32", device=args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    split = make_split(args.data, n_calib=args.calib, n_eval=args.eval, seed=args.seed)
    calib, held = split.calib, split.eval
    assert not ({e.key() for e in calib} & {e.key() for e in held}), "calibration and evaluation overlap"
    batches = calibration_batches(tokenizer, calib, args.batch_size, args.max_len)
    calib_tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    linears = [li for li in linear_map(model) if li.layer is not None]
    modules = dict(model.named_modules())
    eval_bs = args.eval_batch_size or default_batch_size(args.device)

    grams, seconds = {}, {}
    for precision in PRECISIONS:
        best = math.inf
        for _ in range(max(1, args.repeats)):
            t0 = time.perf_counter()
            grams[precision] = collect_grams(model, batches, linears, precision=precision)
            best = min(best, time.perf_counter() - t0)
        seconds[precision] = best
    reference = grams[PRECISIONS[0]]

    factors, errors, failures = {}, {}, {}
    for precision in PRECISIONS:
        whitenings = {}
        factors[precision], errors[precision] = {}, {}
        for info in linears:
            W = modules[info.name].weight.detach()
            wh = whitenings.setdefault(info.gram_key, whitening(grams[precision][info.gram_key]))
            try:
                f = whitened_factors(W, wh, rank_for_keep(info, args.keep))
            except FactorizationError as e:
                failures.setdefault(precision, []).append(f"{info.name}: {e}")
                continue
            factors[precision][info.name] = f
            errors[precision][info.name] = relative_output_error(W, f.merged(), reference[info.gram_key])

    t0 = time.perf_counter()
    teacher_eval = evaluate(model, tokenizer, held, n=args.eval, batch_size=eval_bs, max_len=args.max_len)
    eval_seconds = {"teacher": time.perf_counter() - t0}
    losses = {"teacher": teacher_eval.loss}
    for precision in PRECISIONS:
        if len(factors[precision]) != len(linears):
            losses[precision] = None
            continue
        student = build_student(model, {name: LowRankLinear.from_factors(f, dtype=modules[name].weight.dtype)
                                        .to(modules[name].weight.device)
                                        for name, f in factors[precision].items()})
        t0 = time.perf_counter()
        losses[precision] = evaluate(student, tokenizer, held, n=args.eval, batch_size=eval_bs,
                                     max_len=args.max_len).loss
        eval_seconds[precision] = time.perf_counter() - t0

    rows = []
    ref_err = errors[PRECISIONS[0]]
    for precision in PRECISIONS:
        gram_err = [relative_frobenius(grams[precision][k].gram, g.gram) for k, g in reference.items()]
        change = [abs(errors[precision][n] - ref_err[n]) / ref_err[n] for n in errors[precision]
                  if ref_err.get(n) and errors[precision][n] is not None]
        worst = max((n for n in errors[precision] if ref_err.get(n) and errors[precision][n] is not None),
                    key=lambda n: abs(errors[precision][n] - ref_err[n]) / ref_err[n], default=None)
        loss = losses[precision]
        rows.append({"precision": precision, "collect_seconds": seconds[precision],
                     "gram_rel_frob_max": max(gram_err), "gram_rel_frob_median": statistics.median(gram_err),
                     "trunc_error_mean": statistics.fmean(v for v in errors[precision].values() if v is not None)
                     if errors[precision] else None,
                     "trunc_change_max": max(change) if change else None,
                     "trunc_change_mean": statistics.fmean(change) if change else None,
                     "trunc_abs_change_max": max((abs(errors[precision][n] - ref_err[n]) for n in errors[precision]
                                                  if ref_err.get(n) is not None and errors[precision][n] is not None),
                                                 default=None),
                     "worst_linear": None if worst is None else
                     {"name": worst, "error_float64": ref_err[worst], "error": errors[precision][worst]},
                     "student_loss": loss,
                     "delta_loss_vs_float64": None if loss is None or losses[PRECISIONS[0]] is None
                     else loss - losses[PRECISIONS[0]],
                     "failures": failures.get(precision, [])})
    record = {"model": args.model, "device": args.device, "threads": torch.get_num_threads(),
              "loadavg": list(os.getloadavg()), "torch": torch.__version__,
              "calib_examples": len(calib), "calib_tokens": calib_tokens, "grams": len(reference),
              "linears": len(linears), "eval_examples": teacher_eval.examples, "eval_tokens": teacher_eval.tokens,
              "max_len": args.max_len, "keep": args.keep, "teacher_loss": teacher_eval.loss,
              "eval_seconds": eval_seconds, "split_fingerprint": split.info.fingerprint, "rows": rows}
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    print(f"model {args.model} on {args.device}, torch {torch.__version__}, {record['threads']} threads, "
          f"load average {' '.join(f'{x:.2f}' for x in record['loadavg'])}")
    print(f"calibration: {len(calib)} examples ({calib_tokens:,} tokens, max_len {args.max_len}), "
          f"{len(reference)} Grams of {len(linears)} decoder linears; whitened keep {args.keep}")
    print(f"evaluation: {teacher_eval.examples} held-out examples ({teacher_eval.tokens:,} answer tokens), "
          f"teacher loss {teacher_eval.loss:.4f}")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    head = ("precision", "collect s", "Gram rel err max", "median", "trunc err mean", "Δtrunc max",
            "Δtrunc mean", "student loss", "Δloss vs f64")
    cells = [(r["precision"], fmt(r["collect_seconds"], ".2f"), fmt(r["gram_rel_frob_max"], ".2e"),
              fmt(r["gram_rel_frob_median"], ".2e"), fmt(r["trunc_error_mean"], ".4f"),
              fmt(r["trunc_change_max"], ".2e"), fmt(r["trunc_change_mean"], ".2e"), fmt(r["student_loss"], ".4f"),
              fmt(r["delta_loss_vs_float64"], "+.2e")) for r in rows]
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
    line = lambda c: "| " + " | ".join(x.ljust(w) if i == 0 else x.rjust(w)  # noqa: E731
                                       for i, (x, w) in enumerate(zip(c, widths))) + " |"
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print(line(c))
    for r in rows[1:]:
        w = r["worst_linear"]
        if w:
            print(f"  {r['precision']}: largest Δtrunc at {w['name']}: error {w['error']:.4g} vs float64 "
                  f"{w['error_float64']:.4g}; largest absolute change {r['trunc_abs_change_max']:.2e}")
    for r in rows:
        for f in r["failures"]:
            print(f"  {r['precision']}: factorisation failed: {f}")
    print("Gram rel err: ‖G_P − G_64‖_F / ‖G_64‖_F over the Grams; trunc err: relative output error of the "
          "whitened factors on the float64 Gram; Δtrunc: |e_P − e_64| / e_64 over the linears; Δloss: student_P − "
          "student_64 answer loss on the held-out examples (nats/token).")
    print("note: on CPUs without bf16 matrix units (AVX2) bf16 products are slower than float32, not faster; "
          "the collect seconds measure that on this machine (shared machines: see the load average).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
