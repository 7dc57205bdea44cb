"""Time to a verdict of a comparison with a cold and a warm teacher cache, against a plain transformers loop.

    python bench/compare_speed.py [--model default] [--n 100] [--max-len 512] [--rounds 3] [--threads 2]
                                  [--plan "20-29:mlp:k0.9"] [--batch-size B]

Each measurement is a whole process (model load not timed; scoring timed from the first example to the
verdict), run in alternation (plain, cold, warm rotated each round) with the load average printed before
each, on the same held-out examples (eval side of the default split) and the same student:

- **plain**: ``teacher(ids, labels=...)`` then ``student(ids, labels=...)`` over the examples
  (``eval_throughput.plain_loop``: full-vocabulary logits at every position, one example per forward);
- **cold**: ``compare_models`` with an empty teacher cache (the teacher runs — its leading layers shared
  with the student run once — and its results are written);
- **warm**: ``compare_models`` with the cache the preceding prime run filled (only the student runs).

The student factorises only late layers (``--plan``, default layers 20–29's MLPs at keep 0.9: what a
1 % search leaves), so layers 0–19 are shared with the teacher. Throughput counts the answer tokens of
both models (2 × the answer tokens), as ``eval_throughput.py`` does. The lead's target: warm ≥ 2× plain.
A script that measures and prints, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _setup(args):
    from lowrank_core.compress import CompressSettings, compress
    from lowrank_core.data import make_split
    from lowrank_core.models import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device)
    split = make_split(args.data, n_calib=4, n_eval=args.n)
    student = compress(loaded.model, loaded.tokenizer, args.plan, split.calib,
                       CompressSettings(method="svd", calib=4, hidden_mse=False)).student
    return loaded.model, student, loaded.tokenizer, list(split.eval)[: args.n]


def _plain(teacher, student, tokenizer, examples, max_len: int) -> dict:
    """Both models through ``eval_throughput.plain_loop`` (one example per forward, ``labels=``)."""
    from eval_throughput import plain_loop   # bench/ is this script's folder

    t_loss, tokens, t_seconds = plain_loop(teacher, tokenizer, examples, max_len)
    s_loss, _, s_seconds = plain_loop(student, tokenizer, examples, max_len)
    return {"seconds": t_seconds + s_seconds, "answer_tokens": tokens, "teacher_loss": t_loss, "student_loss": s_loss}


def _compare(teacher, student, tokenizer, examples, args, cache: str) -> dict:
    from lowrank_core.compare import CompareSettings, compare_models

    settings = CompareSettings(examples=len(examples), batch_size=args.batch_size, max_len=args.max_len,
                               bootstrap=200, teacher_cache=cache)
    start = time.perf_counter()
    c = compare_models(teacher, {"student": student}, tokenizer, examples, settings)["student"]
    verdict = c.summary()["verdict"]
    return {"seconds": time.perf_counter() - start, "answer_tokens": int(sum(c.tokens)),
            "teacher_loss": c.loss("teacher"), "student_loss": c.loss("student"), "verdict": verdict}


def child(args) -> None:
    teacher, student, tokenizer, examples = _setup(args)
    if args.child == "plain":
        out = _plain(teacher, student, tokenizer, examples, args.max_len)
    else:
        out = _compare(teacher, student, tokenizer, examples, args, args.cache)
    out.update(mode=args.child, threads=torch.get_num_threads())
    print("RESULT " + json.dumps(out), flush=True)


def _run(mode: str, args, cache: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--cache", cache, "--model", args.model, "--data", args.data,
           "--n", str(args.n), "--max-len", str(args.max_len), "--threads", str(args.threads), "--plan", args.plan,
           "--device", args.device] + (["--batch-size", str(args.batch_size)] if args.batch_size else [])
    print(f"  {mode:6s} load average {os.getloadavg()[0]:.2f}", flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{mode} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--data", default="default")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--plan", default="20-29:mlp:k0.9", help="the student (late layers only: a 1%% search's kind)")
    p.add_argument("--child", choices=("plain", "cold", "warm"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache", default="off", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    root = Path(tempfile.mkdtemp(prefix="lowrank-compare-speed-"))
    warm_dir = root / "warm"
    try:
        print(f"{args.model}: {args.n} held-out examples, max_len {args.max_len}, threads {args.threads}, "
              f"student {args.plan!r}; priming the warm cache")
        _run("cold", args, str(warm_dir))
        modes = ["plain", "cold", "warm"]
        rows = []
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}")
            for mode in modes[r % 3:] + modes[: r % 3]:
                cold_dir = root / f"cold-{r}"
                shutil.rmtree(cold_dir, ignore_errors=True)
                rows.append(_run(mode, args, str(warm_dir if mode == "warm" else cold_dir)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    plain = [x for x in rows if x["mode"] == "plain"]
    plain_rate = sorted(2 * x["answer_tokens"] / x["seconds"] for x in plain)[len(plain) // 2]
    print(f"{'mode':6s} {'seconds':>8s} {'answer tokens':>13s} {'tokens/s':>9s} {'vs plain':>8s} "
          f"{'teacher loss':>12s} {'student loss':>12s} verdict")
    for x in rows:
        rate = 2 * x["answer_tokens"] / x["seconds"]
        print(f"{x['mode']:6s} {x['seconds']:8.2f} {x['answer_tokens']:13d} {rate:9.1f} {rate / plain_rate:7.2f}x "
              f"{x['teacher_loss']:12.5f} {x['student_loss']:12.5f} {x.get('verdict', '-')}")
    for mode in modes:
        rates = sorted(2 * x["answer_tokens"] / x["seconds"] for x in rows if x["mode"] == mode)
        print(f"median {mode:6s} {rates[len(rates) // 2]:9.1f} tokens/s ({rates[len(rates) // 2] / plain_rate:.2f}x plain)")
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
