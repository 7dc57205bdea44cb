"""Benchmark: calibration + ``whitened`` compression of every decoder linear of the embedded model.

Measures wall time of each phase and the peak resident memory (``ru_maxrss``) of this process:
64 calibration examples of <= 512 tokens (default data), plan ``all:k0.8``, method ``whitened``, the
fast path (one whole-model calibration pass over the fit and held-out examples, then one factorisation
per matrix, each shared Gram whitened once). Prints one table and, with ``--json``, one JSON object.

    python bench/compress_speed.py [--calib 64] [--max-len 512] [--plan all:k0.8] [--threads 2]
                                   [--layerwise] [--hidden-mse] [--dtype float32] [--json]

Targets from issue 3: total (calibration + decomposition) <= 40 s on a 2-core machine, peak RSS <= 2.9 GB.
The load average is printed too: other processes on a shared machine slow every phase.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (a contention-robust companion to wall time)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # Linux: KiB


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--data", default="default")
    p.add_argument("--plan", default="all:k0.8")
    p.add_argument("--method", default="whitened")
    p.add_argument("--calib", type=int, default=64)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--layerwise", action="store_true", help="time the layer-by-layer path instead")
    p.add_argument("--hidden-mse", action="store_true", help="also measure per-layer hidden MSE (held-out)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from lowrank_core.compress import CompressSettings, compress
    from lowrank_core.data import make_split
    from lowrank_core.models import load_model

    t0 = time.perf_counter()
    loaded = load_model(args.model, dtype=args.dtype, device="cpu")
    split = make_split(args.data, n_calib=args.calib, n_eval=0)
    t_load = time.perf_counter() - t0
    rss_loaded = peak_rss_gb()
    settings = CompressSettings(method=args.method, calib=args.calib, max_len=args.max_len,
                                batch_size=args.batch_size, layerwise=args.layerwise, hidden_mse=args.hidden_mse)
    load_before = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), cpu_seconds()
    result = compress(loaded.model, loaded.tokenizer, args.plan, split.calib, settings)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    tm = result.timings
    record = {
        "model": loaded.name, "plan": args.plan, "method": args.method, "path": result.split["path"],
        "calib_examples": result.split["examples"],
        "calib_tokens": result.split["fit_tokens"] + result.split["held_out_tokens"],
        "matrices": len(result.layers), "params_before": result.params_before, "params_after": result.params_after,
        "load_seconds": round(t_load, 2), "calibration_seconds": round(tm["calibration"], 2),
        "decomposition_seconds": round(tm["decomposition"], 2),
        "hidden_mse_seconds": round(tm.get("hidden_mse", 0.0), 2), "refit_seconds": round(tm["refit"], 2),
        "compress_seconds": round(wall, 2), "compress_cpu_seconds": round(cpu, 2), "peak_rss_gb": round(peak_rss_gb(), 3),
        "rss_after_load_gb": round(rss_loaded, 3), "threads": args.threads, "dtype": args.dtype,
        "loadavg_before": round(load_before, 2), "loadavg_after": round(os.getloadavg()[0], 2),
        "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    width = max(len(k) for k in record)
    for k, v in record.items():
        print(f"{k:<{width}}  {v}")
    print(f"targets: compress_seconds <= 40 -> {'met' if wall <= 40 else 'NOT met'}; "
          f"peak_rss_gb <= 2.9 -> {'met' if record['peak_rss_gb'] <= 2.9 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
