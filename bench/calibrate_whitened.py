"""Benchmark: calibration Grams + whitened factorisation of every decoder linear of the embedded model.

    python bench/calibrate_whitened.py [--calib 64] [--max-len 512] [--batch-size 4] [--keep 0.8] [--threads 2]

Prints the time of ``collect_grams`` (calibration split of the default data), the time of the whitened
factorisation of all decoder linears at ``keep`` (one whitening per Gram key), the float32-vs-float64
accumulation difference of one Gram, and the peak resident memory (``resource.getrusage``).
"""
from __future__ import annotations

import argparse
import resource
import time

import torch


def cpu_seconds() -> float:
    """User + system CPU time of this process (less sensitive than wall time to other jobs on the cores)."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="default")
    p.add_argument("--data", default="default")
    p.add_argument("--calib", type=int, default=64)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--keep", type=float, default=0.8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from lowrank_core.linears import linear_map
    from lowrank_core.calibrate import collect_grams
    from lowrank_core.data import iter_batches, make_split
    from lowrank_core.decompose import relative_output_error, whitened_factors, whitening
    from lowrank_core.models import device_description, load_model
    from lowrank_core.plan import rank_for_keep

    t0 = time.perf_counter()
    loaded = load_model(args.model, device=args.device)
    model, tok = loaded.model, loaded.tokenizer
    linears = [i for i in linear_map(model) if i.layer is not None]
    examples = make_split(args.data, n_calib=args.calib, n_eval=0).calib
    batches = list(iter_batches(tok, examples, batch_size=args.batch_size, max_len=args.max_len))
    print(f"device {device_description(torch.device(args.device))}; load + data {time.perf_counter() - t0:.1f} s; "
          f"{len(examples)} examples, {sum(int(b['attention_mask'].sum()) for b in batches)} tokens, "
          f"{len(batches)} batches")

    t, c = time.perf_counter(), cpu_seconds()
    grams = collect_grams(model, batches, linears)
    t_calib = time.perf_counter() - t
    print(f"collect_grams: {t_calib:.2f} s wall, {cpu_seconds() - c:.1f} s CPU, for {len(grams)} Grams")

    t, c = time.perf_counter(), cpu_seconds()
    prepared, errors = {}, []
    for info in linears:
        if info.gram_key not in prepared:
            prepared = {k: v for k, v in prepared.items() if k.split(".")[2] == str(info.layer)}  # keep one layer
            prepared[info.gram_key] = whitening(grams[info.gram_key], device=model.device)
        wh = prepared[info.gram_key]
        rank = max(1, rank_for_keep(info, args.keep))
        W = model.get_submodule(info.name).weight
        f = whitened_factors(W, wh, rank)
        errors.append(relative_output_error(W, f.merged(), wh.gram))
    t_fact = time.perf_counter() - t
    print(f"whitened factorisation of {len(linears)} linears at keep {args.keep}: {t_fact:.2f} s wall, "
          f"{cpu_seconds() - c:.1f} s CPU "
          f"(mean rel. output error on calib {sum(errors) / len(errors):.4f}, max {max(errors):.4f}; "
          f"{len(errors)} matrices)")
    print(f"calibration + factorisation: {t_calib + t_fact:.2f} s")

    # float32 per-batch products vs a float64 reference for the last layer's MLP input
    info = next(i for i in reversed(linears) if i.module == "down_proj")
    ref = torch.zeros(info.in_features, info.in_features, dtype=torch.float64)
    mod = model.get_submodule(info.name)

    def hook(m, a):
        x = a[0][hook.mask.bool()].double()
        ref.add_(x.T @ x)
    handle = mod.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for b in batches[:4]:
                hook.mask = b["attention_mask"]
                model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    finally:
        handle.remove()
    fp32 = collect_grams(model, batches[:4], [info])[info.gram_key].gram
    print(f"float32-product Gram vs float64 ({info.name}, 4 batches): max rel. diff "
          f"{float((fp32 - ref).abs().max() / ref.abs().max()):.2e}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print(f"peak RSS {peak:.2f} GB")


if __name__ == "__main__":
    main()
