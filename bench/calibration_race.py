"""Calibration + whitened keep 0.8 of every decoder linear: lowrank's engine against SVD-LLM(W) done plainly.

    python bench/calibration_race.py [--rounds 2] [--calib 64] [--max-len 512] [--threads 2]

Both sides run as whole processes (interpreter start, imports, model load, tokenisation, calibration,
factorisation), alternately (engine, reference, reference, engine, ...) so drifting machine load hits
both alike. The engine side is the CLI: ``python -m lowrank_core compress --plan all:k0.8 --method
whitened --valid-fraction 0 --no-hidden-mse --eval 0`` (the same work as the reference: every example
fits, no held-out report, no evaluation); the reference is ``bench/svdllm_plain.py``. Prints each run's
wall time, peak resident memory (``wait4``) and the load average before it, then the medians and the
ratio engine / reference. A script that measures and prints, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GB, stdout) of one whole process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with status {status}")
    return wall, usage.ru_maxrss / 1024 ** 2, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--calib", type=int, default=64)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--keep", type=float, default=0.8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gram-precision", default="auto")
    args = p.parse_args()
    env = {**os.environ, "LOWRANK_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    engine = [sys.executable, "-m", "lowrank_core", "compress", "--model", "default", "--data", "default",
              "--plan", f"all:k{args.keep}", "--method", "whitened", "--calib", str(args.calib),
              "--max-len", str(args.max_len), "--valid-fraction", "0", "--no-hidden-mse", "--eval", "0",
              "--gram-precision", args.gram_precision, "--json"]
    reference = [sys.executable, "bench/svdllm_plain.py", "--calib", str(args.calib), "--max-len", str(args.max_len),
                 "--keep", str(args.keep), "--threads", str(args.threads)]
    times: dict[str, list[float]] = {"engine": [], "reference": []}
    peaks: dict[str, list[float]] = {"engine": [], "reference": []}
    order = [("engine", engine), ("reference", reference)]
    for r in range(args.rounds):
        for name, cmd in (order if r % 2 == 0 else order[::-1]):
            load = os.getloadavg()[0]
            wall, peak, out = run(cmd, env)
            times[name].append(wall)
            peaks[name].append(peak)
            detail = ""
            if name == "engine":
                record = json.loads(out)["compress"]
                t = record["timings"]
                errors = [row["rel_error_fit"] for row in record["layers"] if row.get("rel_error_fit") is not None]
                detail = (f"calibration {t['calibration']:.1f} s, decomposition {t['decomposition']:.1f} s, "
                          f"{record['split']['fit_tokens']} tokens, {len(errors)} linears, mean rel. output error "
                          f"{sum(errors) / max(len(errors), 1):.4f}")
            else:
                detail = out.strip().split(": ", 1)[-1]
            print(f"round {r + 1} {name:9s}: {wall:6.1f} s wall, peak RSS {peak:.2f} GB, load before {load:.2f} | {detail}",
                  flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"median engine {med['engine']:.1f} s, reference {med['reference']:.1f} s, ratio {med['engine'] / med['reference']:.2f} "
          f"(target <= 0.50); peak RSS engine {max(peaks['engine']):.2f} GB (target <= 2.9), reference "
          f"{max(peaks['reference']):.2f} GB; threads {args.threads}; load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
