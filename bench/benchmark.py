"""Benchmark on the embedded model: uniform plain SVD, whitened, anchored, whitened/anchored + healing,
whitened + rank allocation (at the uniform plan's parameter count), allocation + refit / + healing, at
keep 0.95 / 0.9 / 0.8 of the decoder linears' parameters, and loss budgets. Measures answer loss on the evaluation split, wall times and peak resident memory,
prints a markdown table and writes it (with command, machine and date) to ``--out``.

    python bench/benchmark.py --out docs/benchmarks.md

A script that measures and prints, not a test.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowrank_core.allocate import SearchSettings, allocate, build_profile, fitting_examples, plan_from_ranks  # noqa: E402
from lowrank_core.linears import count_parameters  # noqa: E402
from lowrank_core.compress import CompressSettings, compress  # noqa: E402
from lowrank_core.data import make_split  # noqa: E402
from lowrank_core.evaluate import EvalResult, evaluate  # noqa: E402
from lowrank_core.heal import HealSettings, heal  # noqa: E402
from lowrank_core.options import parse_count  # noqa: E402
from lowrank_core.models import load_model  # noqa: E402
from lowrank_core.plan import account  # noqa: E402
from lowrank_core.methods.refit import RefitSettings  # noqa: E402

COLUMNS = ["keep", "method", "params", "kept", "teacher_loss", "student_loss", "delta",
           "calibration_s", "compression_s", "total_s", "cpu_s", "peak_rss_gib"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--data", default="default")
    p.add_argument("--keeps", default="0.95,0.9,0.8")
    p.add_argument("--methods", default="svd,whitened,anchored,whitened+heal,alloc,alloc+refit,alloc+heal",
                   help="subset of svd, whitened, anchored, refit, whitened+heal, anchored+heal, alloc, "
                        "alloc+refit, alloc+heal")
    p.add_argument("--probe", default="layer", help="allocation sensitivity probe: layer, matrix or gradient")
    p.add_argument("--heal-tokens", default="16k", help="training tokens of the +heal rows")
    p.add_argument("--heal-examples", type=int, default=256, help="calibration-side examples healing trains on")
    p.add_argument("--heal-lr", type=float, default=1e-4)
    p.add_argument("--heal-batch-tokens", type=int, default=1024)
    p.add_argument("--heal-max-len", type=int, default=256)
    p.add_argument("--calib", type=int, default=64)
    p.add_argument("--max-len", type=int, default=512, help="tokens per calibration example")
    p.add_argument("--val", type=int, default=16, help="validation examples (allocation sensitivity)")
    p.add_argument("--val-max-len", type=int, default=256)
    p.add_argument("--eval", type=int, default=200)
    p.add_argument("--eval-max-len", type=int, default=512,
                   help="tokens per evaluation example; the first --eval evaluation examples whose answer "
                        "survives it are scored")
    p.add_argument("--eval-overdraw", type=int, default=3, help="evaluation-side examples drawn per one scored")
    p.add_argument("--eval-batch-size", type=int, default=1, help="examples per forward pass (1: no padding on CPU)")
    p.add_argument("--budgets", default="1%", help="loss budgets for verified allocation rows ('' = none)")
    p.add_argument("--refit-steps", type=int, default=30, help="Adam steps per decoder layer for alloc+refit")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--teacher", default=None,
                   help="'loss,examples,tokens' of an earlier teacher evaluation on the same examples (skips it)")
    p.add_argument("--out", default=None, help="markdown file to write")
    return p.parse_args(argv)


class PeakRSS:
    """Peak resident memory of this process inside a ``with`` block (GiB): VmHWM after resetting it
    through /proc/self/clear_refs, else a 20 ms sampler of VmRSS."""

    def __enter__(self):
        self.peak = 0
        self._stop = threading.Event()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._hwm = True
        except OSError:
            self._hwm = False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._status("VmRSS"))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if self._hwm:
            self.peak = max(self.peak, self._status("VmHWM"))
        self.gib = self.peak / 2 ** 30
        return False


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    except OSError:
        model = platform.processor()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    import transformers

    return (f"{model}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}), {ram:.0f} GiB RAM, "
            f"no GPU; Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")


LOAD_AT_START = os.getloadavg()


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    keeps = [float(k) for k in args.keeps.split(",")]
    methods = args.methods.split(",")
    budgets = [b for b in args.budgets.split(",") if b]
    started = datetime.datetime.now(datetime.timezone.utc)
    loaded = load_model(args.model, dtype="float32", device="cpu")
    teacher, tok = loaded.model, loaded.tokenizer
    n_calib = max(args.calib, args.heal_examples if any("heal" in m for m in methods) else 0)
    split = make_split(args.data, n_calib=n_calib, n_eval=args.eval * args.eval_overdraw, n_val=4 * args.val, seed=0)
    heal_settings = HealSettings(tokens=parse_count(args.heal_tokens), lr=args.heal_lr, batch_size=1,
                                 batch_tokens=args.heal_batch_tokens, max_len=args.heal_max_len)
    val = fitting_examples(tok, split.val, args.val, args.val_max_len)
    eval_examples = fitting_examples(tok, split.eval, args.eval, args.eval_max_len)
    cs = CompressSettings(calib=args.calib, max_len=args.max_len, hidden_mse=False)
    ev = dict(batch_size=args.eval_batch_size, max_len=args.eval_max_len)
    t0 = time.perf_counter()
    if args.teacher:  # reuse a teacher measurement of the same evaluation examples (parallel runs)
        loss, examples, tokens = (float(v) for v in args.teacher.split(","))
        teacher_eval = EvalResult(loss, math.exp(loss), int(tokens), int(examples), 0.0)
    else:
        teacher_eval = evaluate(teacher, tok, eval_examples, **ev)
    print(f"teacher: loss {teacher_eval.loss:.4f} on {teacher_eval.examples} examples / {teacher_eval.tokens} "
          f"answer tokens ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows, notes = [], []

    def record(keep, method, student, params, timings, peak, extra="", cpu=0.0):
        loss = evaluate(student, tok, eval_examples, **ev).loss
        row = {"keep": keep, "method": method, "params": params, "kept": params / count_parameters(teacher),
               "teacher_loss": teacher_eval.loss, "student_loss": loss, "delta": loss - teacher_eval.loss,
               "calibration_s": timings.get("calibration", 0.0), "compression_s": timings.get("compression", 0.0),
               "total_s": timings.get("total", 0.0), "cpu_s": cpu, "peak_rss_gib": peak}
        rows.append(row)
        print(format_row(row), extra, flush=True)
        if args.out:  # rewritten after every row: a long run leaves its partial table behind
            now = datetime.datetime.now(datetime.timezone.utc)
            Path(args.out).write_text(markdown(rows, notes, args, argv, started, now, teacher_eval))

    def healed(keep, label, student, params, timings, cpu0):
        with PeakRSS() as mem:
            t = time.perf_counter()
            h = heal(teacher, student, tok, split.calib[: args.heal_examples], heal_settings)
        notes.append(f"{label} at keep {keep}: healed on {h.tokens:,} tokens in {h.steps} steps, {h.seconds:.0f} s "
                     f"({h.tokens / max(h.seconds, 1e-9):.0f} tokens/s; validation KL {h.initial_valid:.4f} -> "
                     f"{h.best_valid:.4f}, {h.train_examples} training examples)")
        seconds = {"calibration": timings.get("calibration", 0.0),
                   "compression": timings.get("compression", 0.0) + (time.perf_counter() - t),
                   "total": timings.get("total", 0.0) + (time.perf_counter() - t)}
        record(keep, label, student, params, seconds, mem.gib, cpu=time.process_time() - cpu0)

    profile, allocations = None, {}
    if any(m.startswith("alloc") for m in methods) or budgets:
        settings = SearchSettings(val_max_len=args.val_max_len, compression=cs, probe=args.probe)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            profile = build_profile(teacher, tok, split.calib, val, settings)
        notes.append(f"allocation profile (calibration Grams, whitened spectra, sensitivity probes on "
                     f"{profile.val_examples} validation examples, {profile.val_tokens} answer tokens, "
                     f"≤ {args.val_max_len} tokens each): {time.perf_counter() - t0:.0f} s "
                     f"({', '.join(f'{k} {v:.0f} s' for k, v in profile.timings.items())}), peak {mem.gib:.2f} GiB; "
                     "measured once and shared by every allocation row")
        print(notes[-1], flush=True)
    alloc_cost = dict(calibration=profile.timings["calibration"],
                      compression=profile.timings["spectra"] + profile.timings["sensitivity"]) if profile else {}
    # phase 1: uniform plans and allocation at their parameter count
    for keep in keeps:
        uniform = f"all:k{keep}"
        for method in ("whitened", "svd", "anchored", "refit"):
            if method in methods or f"{method}+heal" in methods:
                cpu0 = time.process_time()
                settings = replace(cs, method=method, method_settings={"refit": RefitSettings(steps=args.refit_steps)})
                with PeakRSS() as mem:
                    res = compress(teacher, tok, uniform, split.calib, settings)
                timings = {"calibration": res.timings.get("calibration", 0.0),
                           "compression": res.timings.get("decomposition", 0.0) + res.timings.get("refit", 0.0),
                           "total": res.timings.get("total", 0.0)}
                if method in methods:
                    record(keep, f"uniform {method}", res.student, res.params_after, timings, mem.gib,
                           cpu=time.process_time() - cpu0)
                if f"{method}+heal" in methods:
                    healed(keep, f"uniform {method} + heal", res.student, res.params_after, timings, cpu0)
                del res
            if method == "whitened" and "alloc" in methods:
                target = account(teacher, uniform).compressed
                with PeakRSS() as mem:
                    alloc = allocate(teacher, tok, split.calib, val, budget=None, target_params=target, profile=profile)
                allocations[keep] = alloc.ranks
                t = alloc_cost["compression"] + alloc.timings["search"]
                record(keep, "whitened + allocation", alloc.student, alloc.params_after,
                       {**alloc_cost, "compression": t, "total": alloc_cost["calibration"] + t}, mem.gib,
                       f"(val Δ {alloc.val_loss - alloc.teacher_loss:+.4f})")
                del alloc
    # phase 2: loss budgets (verified on the validation split)
    for budget in budgets:
        with PeakRSS() as mem:
            alloc = allocate(teacher, tok, split.calib, val, budget=budget, profile=profile)
        t = alloc_cost["compression"] + alloc.timings["search"]
        notes.append(f"budget {budget}: {alloc.budget:.4f} nats on the validation split (teacher {alloc.teacher_loss:.4f}); "
                     f"verified student {alloc.val_loss:.4f} (Δ {alloc.val_loss - alloc.teacher_loss:+.4f}) after "
                     f"{len(alloc.verified)} verification passes; {len(alloc.ranks)} matrices factorised")
        record(None, f"allocation, loss budget {budget}", alloc.student,
               alloc.params_after, {**alloc_cost, "compression": t, "total": alloc_cost["calibration"] + t}, mem.gib,
               f"(val Δ {alloc.val_loss - alloc.teacher_loss:+.4f}, budget {alloc.budget:.4f})")
        del alloc
    # phase 3: refit / healing of the allocated plans (the slowest rows last)
    if "alloc+heal" in methods:
        infos = [p.info for p in profile.matrices.values()]
        for keep, ranks in allocations.items():
            cpu0 = time.process_time()
            res = compress(teacher, tok, plan_from_ranks(ranks, infos), split.calib, cs)
            healed(keep, "allocation + heal", res.student, res.params_after,
                   {"calibration": res.timings.get("calibration", 0.0),
                    "compression": res.timings.get("decomposition", 0.0), "total": res.timings.get("total", 0.0)}, cpu0)
            del res
    if "alloc+refit" in methods:
        infos = [p.info for p in profile.matrices.values()]
        for keep, ranks in allocations.items():
            settings = replace(cs, method="refit", method_settings={"refit": RefitSettings(steps=args.refit_steps)})
            with PeakRSS() as mem:
                res = compress(teacher, tok, plan_from_ranks(ranks, infos, method="refit"), split.calib, settings)
            record(keep, "allocation + refit", res.student, res.params_after,
                   {"calibration": res.timings.get("calibration", 0.0),
                    "compression": res.timings.get("decomposition", 0.0) + res.timings.get("refit", 0.0),
                    "total": res.timings.get("total", 0.0)}, mem.gib)
            del res
    finished = datetime.datetime.now(datetime.timezone.utc)
    text = markdown(rows, notes, args, argv, started, finished, teacher_eval)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


def format_row(row: dict) -> str:
    return ("| " + " | ".join(["—" if row["keep"] is None else f"{row['keep']:.2f}", row["method"], f"{row['params']:,}", f"{row['kept']:.1%}",
                               f"{row['teacher_loss']:.4f}", f"{row['student_loss']:.4f}", f"{row['delta']:+.4f}",
                               f"{row['calibration_s']:.1f}", f"{row['compression_s']:.1f}", f"{row['total_s']:.1f}",
                               f"{row['cpu_s']:.0f}", f"{row['peak_rss_gib']:.2f}"]) + " |")


def markdown(rows, notes, args, argv, started, finished, teacher_eval) -> str:
    command = "python bench/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Benchmarks", "",
        f"Measured {started:%Y-%m-%d %H:%M} – {finished:%H:%M} UTC on {machine()}; load average at the start "
        f"{LOAD_AT_START[0]:.2f}, now {os.getloadavg()[0]:.2f} (1-minute).", "",
        "```", command, "```", "",
        f"Model {args.model!r}, data {args.data!r}: calibration {args.calib} examples "
        f"(≤ {args.max_len} tokens, 80 % fit / 20 % held out as in `compress`), allocation validation split "
        f"{args.val} examples (≤ {args.val_max_len} tokens, calibration side), evaluation {teacher_eval.examples} "
        f"examples / {teacher_eval.tokens} answer tokens (the first evaluation-side examples whose answer keeps "
        f"≥ 16 tokens within {args.eval_max_len} tokens). "
        "`keep` is the fraction of each decoder linear's parameters kept by the uniform plan "
        "(`all:k<keep>`); allocation rows are searched to the uniform plan's exact parameter count "
        "(parameter-target mode, within one greedy step). Times in seconds (wall); peak = peak resident "
        "memory of the process during that row.", "",
        "| keep | method | params | kept | teacher loss | student loss | Δ loss | calibration s | compression s | "
        "total s | CPU s | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *[format_row(r) for r in rows], "",
        "Notes:", "",
        *[f"- {n}" for n in notes],
        f"- refit rows: sequential block-level refit, {args.refit_steps} Adam steps per decoder layer at most "
        "(early stopping on held-out calibration tokens).",
        "- compression s: decomposition (+ refit); for allocation rows: spectra + sensitivity probes + greedy "
        "search with one verification pass (the shared profile's cost is repeated in each allocation row).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
