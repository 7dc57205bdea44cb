"""Benchmark: inference speed of factorised students against the dense model (prefill and decode tokens/s).

For the model (``--model default``: the embedded SmolLM2-135M; ``--model tiny`` for a smoke run) and each
keep fraction (plan ``all:k<keep>``, plain ``svd`` factors: speed does not depend on the values; optional
``--rank-multiple``), it measures

- prefill: one forward pass of a ``--batch`` x ``--prompt-len`` batch of random token ids (KV cache on, as
  generation runs it), tokens/s = batch * prompt-len / seconds;
- decode: ``--decode`` greedy steps of one token per sequence with the KV cache of that prefill (a manual
  loop, so no end-of-sequence token stops it early), tokens/s = batch * decode / seconds;

median of ``--repeats`` (after one warm-up), dense first. Prints one table (keep, params, prefill tok/s,
decode tok/s, speed vs dense), the load average and thread count (other processes on a shared machine
slow every row), then the per-shape speed break-even table of ``lowrank_core/speed.py`` at the same
tokens per call. Not a test: nothing is asserted.

    python bench/inference_speed.py [--model default] [--keeps 0.9,0.8,0.6,0.4] [--rank-multiple 64]
                                    [--prompt-len 512] [--batch 1] [--decode 64] [--repeats 3]
                                    [--device cpu] [--dtype float32] [--threads 2] [--no-breakeven] [--json]
    python bench/inference_speed.py --model tiny --prompt-len 32 --decode 8 --repeats 1   # smoke run
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --keeps {text!r}; use comma-separated fractions, e.g. 0.9,0.8") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"bad --keeps {text!r}; every keep must be in (0, 1]")
    return values


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, ids, decode: int, repeats: int, device) -> dict:
    """{prefill_s, decode_s}: medians over ``repeats`` (one untimed warm-up first) of one prefill forward of
    ``ids`` and of ``decode`` greedy one-token steps continuing from its KV cache. As ``generate`` does, only
    the last position's logits are computed (``logits_to_keep=1``) where the model takes it."""
    import torch

    params = inspect.signature(type(model).forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5 renamed the argument
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def cache_of(out):
        return out.cache if hasattr(out, "cache") else out.past_key_values

    prefill, steps = [], []
    with torch.inference_mode():
        for i in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, **keep)
            _sync(device)
            t1 = time.perf_counter()
            past, nxt = cache_of(out), out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(decode):
                out = model(input_ids=nxt, use_cache=True, **{cache_kw: past}, **keep)
                past, nxt = cache_of(out), out.logits[:, -1].argmax(-1, keepdim=True)
            _sync(device)
            t2 = time.perf_counter()
            if i:  # the first round warms up kernels, allocator and caches
                prefill.append(t1 - t0)
                steps.append(t2 - t1)
    return {"prefill_s": statistics.median(prefill), "decode_s": statistics.median(steps) if decode else None}


def student_at(teacher, linears, keep: float, rank_multiple: int):
    """(student, assignments) for plan ``all:k<keep>`` with plain SVD factors (no calibration)."""
    from lowrank_core import methods
    from lowrank_core.plan import Plan, load_plan, resolve_plan
    from lowrank_core.student import low_rank_student

    plan = load_plan(f"all:k{keep}")
    plan = Plan(plan.rules, rank_multiple=rank_multiple)
    assignments = resolve_plan(plan, linears, "svd")
    modules = dict(teacher.named_modules())
    svd = methods.get("svd")
    factors = {name: svd.factorize(modules[name].weight.detach(), a.rank, bias=modules[name].bias)
               for name, a in assignments.items()}
    return low_rank_student(teacher, factors), assignments


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M), tiny, a folder, ...")
    p.add_argument("--keeps", type=_floats, default=[0.9, 0.8, 0.6, 0.4], help="keep fractions, comma-separated")
    p.add_argument("--rank-multiple", type=int, default=1, choices=(1, 8, 16, 32, 64, 128),
                   help="round every rank down to a multiple of this (1 = off)")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens per sequence (prefill)")
    p.add_argument("--batch", type=int, default=1, help="sequences per batch")
    p.add_argument("--decode", type=int, default=64, help="greedy new tokens per sequence (decode)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median), after one warm-up")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--no-breakeven", action="store_true", help="skip the per-shape speed break-even table")
    p.add_argument("--json", action="store_true", help="also print one JSON object with every number")
    args = p.parse_args(argv)
    for name in ("prompt_len", "batch", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if args.decode < 0:
        p.error(f"--decode {args.decode} must be at least 0")

    import torch

    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads {args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    from lowrank_core.linears import count_parameters, linear_map
    from lowrank_core.models import load_model, resolve_dtype
    from lowrank_core.speed import measure_shapes, shape_groups, speed_rows
    from lowrank_core.table import format_table

    load_before = os.getloadavg()
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    teacher, device = loaded.model, torch.device(loaded.device)
    linears = linear_map(teacher)
    vocab = teacher.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=gen).to(device)
    prefill_tokens, decode_tokens = args.batch * args.prompt_len, args.batch * args.decode

    rows, plans = [], {}
    start = time.perf_counter()
    for keep in [None] + list(args.keeps):
        if keep is None:
            model, label = teacher, "dense"
        else:
            model, assignments = student_at(teacher, linears, keep, args.rank_multiple)
            label = f"{keep:g}"
            plans[f"rank at k{keep:g}"] = {name: a.rank for name, a in assignments.items()}
        t = measure(model, ids, args.decode, args.repeats, device)
        row = {"keep": label, "params": count_parameters(model),
               "prefill tok/s": prefill_tokens / t["prefill_s"],
               "decode tok/s": decode_tokens / t["decode_s"] if t["decode_s"] else None,
               "prefill_s": t["prefill_s"], "decode_s": t["decode_s"]}
        if rows:
            dense = rows[0]
            row["prefill vs dense"] = f"{row['prefill tok/s'] / dense['prefill tok/s']:.2f}x"
            row["decode vs dense"] = (f"{row['decode tok/s'] / dense['decode tok/s']:.2f}x"
                                      if row["decode tok/s"] and dense["decode tok/s"] else None)
        else:
            row["prefill vs dense"] = row["decode vs dense"] = "1.00x"
        rows.append(row)
        print(f"[{time.perf_counter() - start:6.1f} s] keep {label}: prefill {row['prefill tok/s']:.1f} tok/s, "
              f"decode {row['decode tok/s'] or 0:.1f} tok/s", file=sys.stderr, flush=True)
        if model is not teacher:
            del model

    print(f"model {loaded.name} on {device} ({args.dtype}), {torch.get_num_threads()} torch threads; "
          f"batch {args.batch} x prompt {args.prompt_len} tokens, {args.decode} decode steps, median of "
          f"{args.repeats}; plan all:k<keep>, svd factors" + (f", ranks rounded to multiples of {args.rank_multiple}"
                                                             if args.rank_multiple != 1 else ""))
    shown = [{**r, "prefill tok/s": round(r["prefill tok/s"]),
              "decode tok/s": None if r["decode tok/s"] is None else round(r["decode tok/s"], 1)} for r in rows]
    print(format_table(shown, ["keep", "params", "prefill tok/s", "decode tok/s", "prefill vs dense",
                               "decode vs dense"]))
    load_after = os.getloadavg()
    print(f"load average (1, 5, 15 min): before {', '.join(f'{v:.2f}' for v in load_before)}; after "
          f"{', '.join(f'{v:.2f}' for v in load_after)}; cores {os.cpu_count()}, torch threads {torch.get_num_threads()}")

    breakeven = []
    if not args.no_breakeven:
        groups = shape_groups(linears)
        tokens = (prefill_tokens, args.batch)
        labels = {prefill_tokens: "prefill", args.batch: "decode"}
        measured = measure_shapes(groups, tokens, device, resolve_dtype(args.dtype))
        breakeven = speed_rows(groups, measured, plans, tokens=tokens, labels=labels)
        print()
        print(f"speed break-even per shape ({device}, {args.dtype}; tokens per call: {prefill_tokens} prefill, "
              f"{args.batch} decode): the largest rank whose factor pair runs no slower than the dense matmul")
        print(format_table(breakeven))
        breakeven_points = [m.to_dict() for m in measured.values()]
    if args.json:
        print(json.dumps({"model": loaded.name, "device": str(device), "dtype": args.dtype,
                          "threads": torch.get_num_threads(), "batch": args.batch, "prompt_len": args.prompt_len,
                          "decode": args.decode, "repeats": args.repeats, "rank_multiple": args.rank_multiple,
                          "load_before": load_before, "load_after": load_after, "rows": rows,
                          "breakeven": breakeven,
                          "breakeven_points": breakeven_points if breakeven else []}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
