"""Evaluation throughput: answer tokens per second of lowrank's scoring against a plain transformers loop.

    python bench/eval_throughput.py [--n 100] [--max-len 512] [--batch-sizes 1,4,8] [--threads 2] [--bf16]

On the same held-out examples (eval side of the default split) and the same answer tokens:

- **plain**: one example per forward, ``model(input_ids, labels=labels)`` (full-vocabulary logits at
  every position, the loss as transformers computes it), the loss weighted by answer tokens;
- **evaluate**: ``lowrank_core.evaluate.evaluate`` (logits only where answer tokens are scored) per
  batch size;
- **compare**: ``lowrank_core.compare.compare_models`` of the teacher against one student (uniform
  ``svd`` keep 0.8: speed does not depend on the factor values), per batch size (batches > 1 are
  length-bucketed); its throughput counts the answer tokens of both models, so "as fast as one model's
  evaluation" means the same tokens/s as ``evaluate``.

Prints seconds, answer tokens/s and the speed-up over plain, the loss each path found (they must
agree), the thread count and the load average. A script that measures and prints, not a test.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def plain_loop(model, tokenizer, examples, max_len: int) -> tuple[float, int, float]:
    """(mean answer loss, answer tokens, seconds) of the textbook loop."""
    from lowrank_core.data import encode_example

    total = tokens = 0.0
    start = time.perf_counter()
    with torch.no_grad():
        for ex in examples:
            enc = encode_example(tokenizer, ex, max_len)
            if enc is None:
                continue
            ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
            n = int((labels[:, 1:] != -100).sum())
            out = model(input_ids=ids, labels=labels)
            total += float(out.loss) * n
            tokens += n
    return total / tokens, int(tokens), time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--data", default="default")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--batch-sizes", default="1,4,8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="also time compare with bf16 autocast")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from lowrank_core.compare import CompareSettings, compare_models
    from lowrank_core.data import make_split
    from lowrank_core.evaluate import evaluate
    from lowrank_core.models import load_model
    from lowrank_core.compress import CompressSettings, compress

    loaded = load_model(args.model, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    split = make_split(args.data, n_calib=4, n_eval=args.n)
    examples = list(split.eval)[: args.n]
    student = compress(model, tok, "all:k0.8", split.calib, CompressSettings(method="svd", calib=4,
                                                                             hidden_mse=False)).student
    print(f"{len(examples)} held-out examples, max_len {args.max_len}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    rows = []
    loss, tokens, seconds = plain_loop(model, tok, examples, args.max_len)
    rows.append(("plain loop, model(ids, labels=...)", 1, loss, tokens, seconds))
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        r = evaluate(model, tok, examples, max_len=args.max_len, batch_size=bs)
        rows.append(("evaluate (teacher)", bs, r.loss, r.tokens, r.seconds))
    variants = [(False, "compare (teacher + student)")] + ([(True, "compare, bf16 autocast")] if args.bf16 else [])
    for bf16, label in variants:
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            settings = CompareSettings(examples=len(examples), batch_size=bs, max_len=args.max_len, bf16=bf16,
                                       bootstrap=200, teacher_cache="off")  # compare_speed.py times the cache
            t0 = time.perf_counter()
            c = compare_models(model, {"student": student}, tok, examples, settings)["student"]
            rows.append((label, bs, c.loss("teacher"), 2 * int(sum(c.tokens)), time.perf_counter() - t0))
    plain_rate = rows[0][3] / rows[0][4]
    print(f"{'path':38s} {'batch':>5s} {'teacher loss':>12s} {'answer tokens':>13s} {'seconds':>8s} "
          f"{'tokens/s':>9s} {'vs plain':>8s}")
    for label, bs, loss, tokens, seconds in rows:
        rate = tokens / seconds
        print(f"{label:38s} {bs:5d} {loss:12.5f} {tokens:13d} {seconds:8.1f} {rate:9.1f} {rate / plain_rate:7.2f}x")
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
