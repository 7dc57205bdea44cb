"""Measure dense vs factorized exports of one student: bytes on disk, parameters, write/verify seconds.

    python bench/export_sizes.py                       # seed experiment 3 on the embedded model
    python bench/export_sizes.py --plan "all:k0.5" --method whitened --calib 16
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowrank_core.compress import CompressSettings, compress
from lowrank_core.data import make_split
from lowrank_core.export import export_student
from lowrank_core.models import load_model
from lowrank_core.table import format_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--plan", default="17:mlp:r16")
    p.add_argument("--method", default="svd")
    p.add_argument("--calib", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu")
    split = make_split("default", n_calib=args.calib, n_eval=0)
    t0 = time.perf_counter()
    result = compress(loaded.model, loaded.tokenizer, args.plan, split.calib,
                      CompressSettings(method=args.method, calib=args.calib, hidden_mse=False))
    print(f"{args.model} plan {args.plan!r} ({args.method}): compressed in {time.perf_counter() - t0:.1f} s")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("dense", "factorized"):
            x = export_student(result.student, loaded.tokenizer, Path(tmp) / fmt, fmt)
            rows.append({"format": fmt, "MB_on_disk": f"{x.bytes_on_disk / 1e6:.1f}",
                         "MB_weights": f"{x.weight_bytes / 1e6:.1f}", "parameters": f"{x.parameters:,}",
                         "max_logit_diff": f"{x.max_logit_diff:.2g}", "write_s": f"{x.seconds['write']:.1f}",
                         "verify_s": f"{x.seconds['verify']:.1f}"})
    print(format_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
