"""Compare compression methods on one plan: the teacher and every student scored in ONE evaluation pass.

    python bench/compress_methods.py --plan all:k0.9 --methods svd,whitened,refit --calib 64 --eval 200 \
        [--refit-steps 40 --refit-lr 1e-4] [--layerwise] [--json]

Each method runs ``compress`` on the same calibration split (the calib side of the honest split) and the
students are scored with the teacher on the same ``--eval`` examples of the eval side
(``evaluate_models``), so the teacher loss is computed once. Prints per method: parameters, teacher and
student answer loss, compression time by phase, and the mean held-out relative error of the matrices.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--data", default="default")
    p.add_argument("--plan", default="all:k0.9")
    p.add_argument("--methods", default="svd,whitened,refit",
                   help="comma list of METHOD or METHOD@PLAN (e.g. svd@17:mlp:r16 adds seed experiment 3)")
    p.add_argument("--calib", type=int, default=64)
    p.add_argument("--eval", type=int, default=200)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--layerwise", action="store_true", help="svd/whitened on the layer-by-layer path too")
    p.add_argument("--refit-steps", type=int, default=40)
    p.add_argument("--refit-lr", type=float, default=1e-4)
    p.add_argument("--refit-batch-tokens", type=int, default=2048)
    p.add_argument("--refit-patience", type=int, default=3)
    p.add_argument("--refit-target", default="block")
    p.add_argument("--eval-batch-size", type=int, default=None, help="default: 1 on CPU, 8 on CUDA")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from lowrank_core.compress import CompressSettings, compress
    from lowrank_core.methods.refit import RefitSettings
    from lowrank_core.data import iter_side, make_split
    from lowrank_core.evaluate import default_batch_size, evaluate_models
    from lowrank_core.models import load_model
    from lowrank_core.progress import TqdmProgress

    loaded = load_model(args.model, device="cpu")
    split = make_split(args.data, n_calib=args.calib, n_eval=0, seed=args.seed)
    students, runs = {}, {}
    for label in args.methods.split(","):
        method, _, plan = label.partition("@")
        plan = plan or args.plan
        refit = RefitSettings(steps=args.refit_steps, lr=args.refit_lr, batch_tokens=args.refit_batch_tokens,
                              patience=args.refit_patience, target=args.refit_target, seed=args.seed)
        settings = CompressSettings(method=method, calib=args.calib, max_len=args.max_len,
                                    batch_size=args.batch_size, seed=args.seed, layerwise=args.layerwise,
                                    method_settings={"refit": refit})
        bar = TqdmProgress(method)
        result = compress(loaded.model, loaded.tokenizer, plan, split.calib, settings, progress=bar)
        bar.close()
        method = label
        students[method] = result.student
        errors = [r["rel_error"] for r in result.layers if r["rel_error"] is not None]
        runs[method] = {"plan": plan, "params_before": result.params_before, "params_after": result.params_after,
                        "path": result.split["path"], "timings": {k: round(v, 1) for k, v in result.timings.items()},
                        "mean_rel_error": sum(errors) / max(1, len(errors)),
                        "last_layer_rel_mse": result.hidden_mse[-1]["rel_mse"] if result.hidden_mse else None,
                        "split": result.split}
        if result.refit_curves:
            curves = result.refit_curves.values()
            runs[method]["refit_steps_total"] = sum(c["steps"] for c in curves)
            runs[method]["refit_valid_gain"] = sum(c["best_valid"] / c["initial_valid"] for c in curves) / len(curves)
        print(f"{method}: {json.dumps(runs[method], default=str)}", file=sys.stderr, flush=True)
    bar = TqdmProgress("evaluate")
    eval_bs = args.eval_batch_size or default_batch_size(loaded.device)
    t0 = time.perf_counter()
    # the eval side streamed lazily: the first --eval examples that fit max_len (as `evaluate --n`)
    scores = evaluate_models({"teacher": loaded.model, **students}, loaded.tokenizer,
                             iter_side(args.data, "eval", seed=args.seed), n=args.eval, batch_size=eval_bs,
                             max_len=args.max_len, progress=bar)
    bar.close()
    teacher = scores["teacher"]
    record = {"command": "python bench/compress_methods.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "plan": args.plan, "calib_examples": args.calib, "eval_examples": teacher.examples,
              "eval_tokens": teacher.tokens, "teacher_loss": teacher.loss,
              "evaluation_seconds": round(time.perf_counter() - t0, 1),
              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 3),
              "split_info": split.info.to_dict(),
              "methods": {m: {**runs[m], "student_loss": scores[m].loss, "delta": scores[m].loss - teacher.loss}
                          for m in students}}
    if args.json:
        print(json.dumps(record, indent=2, default=str))
        return 0
    print(f"plan {args.plan}; calib {args.calib} examples; eval {teacher.examples} examples "
          f"({teacher.tokens:,} answer tokens); teacher loss {teacher.loss:.4f}")
    for m, r in record["methods"].items():
        print(f"{m:>9}: params {r['params_after']:,}/{r['params_before']:,}  student loss {r['student_loss']:.4f} "
              f"(delta {r['delta']:+.4f})  mean held-out rel error {r['mean_rel_error']:.4f}  times {r['timings']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
