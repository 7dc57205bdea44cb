"""Time the whole 7B path on one layer: calibrate, decompose, heal and evaluate a random Mistral-sized model
(hidden 4096, MLP 14336, 32 query / 8 KV heads, vocabulary 32,002, untied head; default ONE decoder layer)
and extrapolate every phase to the 32-layer Mistral-7B-OpenOrca job.

    python bench/gpu_check.py                      # CUDA, bf16, 1 layer: 64 x 512-token calibration,
                                                   # heal 8192 tokens, evaluate 64 held-out examples
    python bench/gpu_check.py --layers 2 --json    # more layers, one JSON object
    python bench/gpu_check.py --tiny --device cpu  # the same code at toy widths on CPU (seconds)
    python bench/gpu_check.py --teacher-on cpu --phases compress   # the 24 GB-card layout, compression only

Phases (each timed in wall seconds, with ``torch.cuda.synchronize()``; peak GPU memory allocated per phase,
``torch.cuda.max_memory_allocated`` reset between phases; peak resident CPU memory per phase, the
kernel's VmHWM reset between phases where ``/proc/self/clear_refs`` allows, else the process peak):

1. build: the random model (a real 7B job loads weights instead: not extrapolated);
2. calibration + decomposition: ``lowrank_core.compress.compress`` with ``layerwise=True`` (one decoder
   layer's Grams at a time, float64 sums, whitened keep 0.8 on every decoder linear) on synthetic
   calibration text. Its split into "embedding capture (once)", "Gram passes (per layer)" and
   "decomposition (per layer)" comes from thin timing wrappers around ``capture_layer_inputs``,
   ``gram_pass`` and ``_low_rank`` (module globals of ``compress``, and ``layerwise.gram_pass``: the walker's
   per-layer Gram pass; nothing else changes);
3. heal: ``lowrank_core.heal.heal`` (KL to the teacher, calibration-side examples, bf16 autocast on CUDA)
   for ``--heal-tokens`` real tokens;
4. evaluate: ``lowrank_core.compare.compare_models`` teacher vs student on ``--eval`` synthetic held-out
   examples (different text from the calibration examples), batch 8 on CUDA, bf16 autocast on CUDA.

Extrapolation to 32 layers: calibration and decomposition per layer x 32 (+ the embedding capture once);
heal and evaluation = measured x (32·F_layer + F_head) / (L·F_layer + F_head), F = forward FLOPs per token
(F_layer = 2·linear params of a layer + 4·hidden·T for attention at mean context T = max_len/2, F_head =
2·vocab·hidden), x job tokens / measured tokens (``--job-heal-tokens``, ``--job-eval``; default: the
measured budgets). Fixed per-call costs get scaled too, so the heal / eval figures are upper-ish bounds.

Synthetic text is random letters (with the byte-level tiny tokenizer 1 character = 1 token): the cost does
not depend on the content, the losses mean nothing. ``--teacher-on cpu`` keeps the model in CPU memory and
moves one layer at a time to the GPU during compression, as for a real 7B teacher on a 24 GB card; heal and
evaluation then move the (small, 1-layer) model to the GPU (a 7B heal needs an 80 GB card: docs/7b-path.md).
A script that measures and prints, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import string
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lowrank_core.compress as compress_module  # noqa: E402
import lowrank_core.layerwise as layerwise_module  # noqa: E402
from lowrank_core.linears import count_parameters, linear_map  # noqa: E402
from lowrank_core.compare import CompareSettings, compare_models  # noqa: E402
from lowrank_core.compress import CompressSettings, compress  # noqa: E402
from lowrank_core.data import Example  # noqa: E402
from lowrank_core.heal import HealSettings, heal  # noqa: E402
from lowrank_core.models import tiny_tokenizer  # noqa: E402

MISTRAL = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=32002, full_layers=32)
TINY = dict(hidden_size=256, intermediate_size=896, num_attention_heads=8, num_key_value_heads=2,
            vocab_size=32002, full_layers=32)
PHASES = ("compress", "heal", "eval")
# defaults that depend on --tiny: (full size, tiny)
SIZED = {"calib": (64, 8), "seq_len": (512, 128), "heal_tokens": (8192, 1024), "heal_max_len": (256, 128),
         "eval": (64, 8)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="toy widths (hidden 256, MLP 896) and budgets for a CPU check")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32", "float16"),
                   help="weights dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--layers", type=int, default=1, help="decoder layers built (time is per layer)")
    p.add_argument("--calib", type=int, default=None, help="calibration sequences (default 64; tiny 8)")
    p.add_argument("--seq-len", type=int, default=None, help="answer tokens per synthetic sequence (default 512; tiny 128)")
    p.add_argument("--keep", type=float, default=0.8, help="keep fraction of every decoder linear")
    p.add_argument("--teacher-on", default=None, choices=("cpu", "device"),
                   help="where the model lives during compression (default: on the compute device)")
    p.add_argument("--phases", default=",".join(PHASES),
                   help="comma list of compress,heal,eval (heal and eval need compress); default all")
    p.add_argument("--heal-tokens", type=int, default=None, help="healing budget in real tokens (default 8192; tiny 1024)")
    p.add_argument("--heal-max-len", type=int, default=None, help="tokens per healing example (default 256; tiny 128)")
    p.add_argument("--eval", type=int, default=None, help="held-out synthetic examples compared (default 64; tiny 8)")
    p.add_argument("--eval-batch-size", type=int, default=None, help="default 8 on CUDA, 1 on CPU")
    p.add_argument("--job-heal-tokens", type=int, default=None,
                   help="heal budget of the 7B job the extrapolation is for (default: --heal-tokens)")
    p.add_argument("--job-eval", type=int, default=None,
                   help="evaluation examples of the 7B job the extrapolation is for (default: --eval)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    for name, (full, tiny) in SIZED.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    bad = [x for x in args.phases if x not in PHASES]
    if bad or "compress" not in args.phases:
        p.error(f"--phases must name compress and optionally heal, eval (got {args.phases})")
    if args.layers < 1:
        p.error("--layers must be >= 1")
    return args


def build_model(shape: dict, layers: int, dtype: torch.dtype, device: str):
    """A random Mistral-architecture causal LM with ``layers`` decoder layers."""
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
                           num_attention_heads=shape["num_attention_heads"],
                           num_key_value_heads=shape["num_key_value_heads"], num_hidden_layers=layers,
                           vocab_size=shape["vocab_size"], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.requires_grad_(False)
    return model.eval()


def synthetic_examples(n: int, seq_len: int, seed: int = 0) -> list:
    """Chat examples of random letters; with the byte-level tiny tokenizer 1 character = 1 token."""
    rng = random.Random(seed)
    letters = string.ascii_lowercase + " "
    text = lambda k: "".join(rng.choice(letters) for _ in range(k))  # noqa: E731
    return [Example(system="", user=text(seq_len // 4), answer=text(seq_len)) for _ in range(n)]


# ----------------------------------------------------------------------------- measuring
def _rss_gib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return None


class Meter:
    """Peak GPU memory allocated and peak RSS per phase. ``switch(name)`` closes the current phase (its
    peaks recorded, the counters reset) and opens ``name``; re-opening a phase adds to its maxima."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.gpu: dict[str, float] = {}
        self.rss: dict[str, float] = {}
        self.current: str | None = None
        self.rss_resettable = self._reset_rss()

    @staticmethod
    def _reset_rss() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            return True
        except OSError:
            return False

    def switch(self, name: str | None) -> None:
        if self.current is not None:
            if self.cuda:
                peak = torch.cuda.max_memory_allocated() / 2 ** 30
                self.gpu[self.current] = max(self.gpu.get(self.current, 0.0), peak)
            hwm = _rss_gib("VmHWM") if self.rss_resettable else None
            if hwm is None:
                hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
            self.rss[self.current] = max(self.rss.get(self.current, 0.0), hwm)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        if self.rss_resettable:
            self._reset_rss()
        self.current = name


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


class CompressProbe:
    """Timing wrappers around compress's embedding capture, Gram passes and factorisations (restored by
    ``close``): they switch the meter's phase and record when the capture ended."""

    def __init__(self, meter: Meter, cuda: bool):
        self.meter, self.cuda = meter, cuda
        self.capture_end = None
        self.capture_s = 0.0
        self.targets = {"capture_layer_inputs": compress_module, "gram_pass": layerwise_module,
                        "_low_rank": compress_module}
        self.originals = {k: getattr(m, k) for k, m in self.targets.items()}
        compress_module.capture_layer_inputs = self._wrap("capture_layer_inputs", "capture", capture=True)
        layerwise_module.gram_pass = self._wrap("gram_pass", "grams")
        compress_module._low_rank = self._wrap("_low_rank", "decomposition")

    def _wrap(self, name, phase, capture=False):
        original = self.originals[name]

        def wrapper(*a, **kw):
            sync(self.cuda)
            self.meter.switch(phase)
            t0 = time.perf_counter()
            out = original(*a, **kw)
            sync(self.cuda)
            if capture:
                self.capture_end = time.perf_counter()
                self.capture_s += self.capture_end - t0
            self.meter.switch("compress other")
            return out
        return wrapper

    def close(self):
        for k, v in self.originals.items():
            setattr(self.targets[k], k, v)


class LayerClock:
    """Progress callback recording the wall time at which each decoder layer finishes (stage ``layer``
    reaching a new count: its sub-steps report the count of the layers already done)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.marks: list[float] = []

    def __call__(self, done, total, message="", *, stage="", metrics=None):
        if stage == "layer" and done > len(self.marks):
            self.marks.append(time.perf_counter())

    def per_layer(self) -> list[float]:
        times = [self.start] + self.marks
        return [b - a for a, b in zip(times, times[1:])]


def forward_flops(shape: dict, layer_params: int, max_len: int) -> tuple[float, float]:
    """(F_layer, F_head): forward FLOPs per token of one decoder layer and of the head."""
    h = shape["hidden_size"]
    mean_context = max_len / 2
    return 2.0 * layer_params + 2.0 * 2 * h * mean_context, 2.0 * shape["vocab_size"] * h


def layer_scale(shape: dict, layer_params: int, max_len: int, layers: int, full: int) -> float:
    f_layer, f_head = forward_flops(shape, layer_params, max_len)
    return (full * f_layer + f_head) / (layers * f_layer + f_head)


# ----------------------------------------------------------------------------- the run
def main(argv=None) -> int:
    args = parse_args(argv)
    shape = TINY if args.tiny else MISTRAL
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; run with --device cpu (and --tiny for a quick check)")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    home = "cpu" if args.teacher_on == "cpu" else args.device
    n_full, L = shape["full_layers"], args.layers
    meter = Meter(cuda)
    rows: list[dict] = []

    def row(phase, seconds, key, extrapolated, note):
        rows.append({"phase": phase, "seconds": seconds, "peak_gpu_gib": meter.gpu.get(key) if cuda else None,
                     "peak_rss_gib": meter.rss.get(key), "extrapolated_7b_seconds": extrapolated, "note": note})

    # 1. build
    meter.switch("build")
    t0 = time.perf_counter()
    model = build_model(shape, L, dtype, home)
    sync(cuda)
    build_s = time.perf_counter() - t0
    meter.switch(None)
    tokenizer = tiny_tokenizer()
    calib = synthetic_examples(args.calib, args.seq_len, seed=0)
    held = synthetic_examples(args.eval, args.seq_len, seed=1)
    overlap = {e.key() for e in calib} & {e.key() for e in held}
    if overlap:
        raise SystemExit("synthetic evaluation examples overlap the calibration examples")
    layer_params = sum(li.params for li in linear_map(model) if li.layer == 0)
    row(f"build random model ({L} layer{'s' * (L > 1)})", build_s, "build", None,
        f"{count_parameters(model) / 1e6:.0f} M params; a 7B job loads weights instead")

    # 2. calibration + decomposition (compress)
    settings = CompressSettings(method="whitened", calib=args.calib, max_len=args.seq_len + 64, batch_size=4,
                                layerwise=True, device=args.device, offload=(home == "cpu"), hidden_mse=True)
    plan = {"rules": [{"layers": "all", "modules": ["all"], "keep": args.keep}]}
    probe = CompressProbe(meter, cuda)
    sync(cuda)
    meter.switch("compress other")
    clock = LayerClock()
    try:
        result = compress(model, tokenizer, plan, calib, settings, progress=clock)
        sync(cuda)
    finally:
        probe.close()
    compress_s = time.perf_counter() - clock.start
    meter.switch(None)
    per_layer = clock.per_layer()
    t = result.timings
    capture_s = probe.capture_s
    grams_s = max(0.0, t.get("calibration", 0.0) - capture_s)
    decomp_s = t.get("decomposition", 0.0)
    before_layers = (probe.capture_end or clock.start) - clock.start     # batch prep + capture
    layers_wall = (clock.marks[-1] - (probe.capture_end or clock.start)) if clock.marks else compress_s
    fixed = max(0.0, compress_s - (clock.marks[-1] - clock.start if clock.marks else compress_s))
    compress_7b = before_layers + layers_wall / L * n_full + fixed
    calib_tokens = result.split.get("fit_tokens", 0) + result.split.get("held_out_tokens", 0)
    peak = lambda *keys: max((meter.gpu.get(k, 0.0) for k in keys), default=0.0)  # noqa: E731
    meter.gpu["compress"] = peak("capture", "grams", "decomposition", "compress other")
    meter.rss["compress"] = max(meter.rss.get(k, 0.0) for k in ("capture", "grams", "decomposition", "compress other"))
    row("calibration: embedding capture (once)", capture_s, "capture", capture_s,
        f"{calib_tokens:,} calib tokens; not per layer")
    row("calibration: Gram passes + layer runs", grams_s, "grams", grams_s / L * n_full, f"per layer x {n_full}")
    row(f"decomposition (whitened keep {args.keep})", decomp_s, "decomposition", decomp_s / L * n_full,
        f"per layer x {n_full}")
    row("compress total (wall)", compress_s, "compress", compress_7b,
        f"prep+capture {before_layers:.1f} + {n_full} x {layers_wall / L:.2f} s/layer + {fixed:.1f} fixed")

    student = result.student
    if home != args.device and ("heal" in args.phases or "eval" in args.phases):
        model.to(args.device)       # moves the shared tensors: the student's untouched weights follow
        student.to(args.device)
    heal_record = eval_record = None

    # 3. heal
    if "heal" in args.phases:
        hs = HealSettings(tokens=args.heal_tokens, max_len=args.heal_max_len, autocast="auto")
        sync(cuda)
        meter.switch("heal")
        t0 = time.perf_counter()
        healed = heal(model, student, tokenizer, calib, hs)
        sync(cuda)
        heal_s = time.perf_counter() - t0
        meter.switch(None)
        scale = layer_scale(shape, layer_params, args.heal_max_len, L, n_full)
        job_heal = args.job_heal_tokens or healed.tokens   # heal stops at the step that crosses the budget
        heal_record = {"tokens": healed.tokens, "steps": healed.steps, "initial_valid": healed.initial_valid,
                       "best_valid": healed.best_valid, "train_examples": healed.train_examples,
                       "valid_examples": healed.valid_examples, "trained_parameters": healed.trained_parameters,
                       "flop_scale": scale, "job_tokens": job_heal}
        row(f"heal ({healed.tokens:,} tokens, {healed.steps} steps)", heal_s, "heal",
            heal_s * scale * job_heal / max(1, healed.tokens),
            f"x{scale:.1f} FLOPs{f' x {job_heal:,}/{healed.tokens:,} tokens' if job_heal != healed.tokens else ''}; "
            f"{healed.tokens / heal_s:,.0f} tok/s; "
            f"{'bf16 autocast' if cuda else 'float32'}")

    # 4. evaluate
    job_eval = args.job_eval or args.eval
    if "eval" in args.phases:
        batch = args.eval_batch_size or (8 if cuda else 1)
        cs = CompareSettings(examples=args.eval, batch_size=batch, max_len=args.seq_len + 64, bf16=cuda,
                             bootstrap=1000)
        sync(cuda)
        meter.switch("eval")
        t0 = time.perf_counter()
        comparison = compare_models(model, {"student": student}, tokenizer, held, cs)["student"]
        sync(cuda)
        eval_s = time.perf_counter() - t0
        meter.switch(None)
        summary = comparison.summary()
        scale = layer_scale(shape, layer_params, args.seq_len + 64, L, n_full)
        eval_record = {k: summary[k] for k in ("examples", "tokens", "teacher_loss", "student_loss", "delta",
                                               "delta_ci", "kl", "top1_agreement", "verdict")}
        eval_record.update(flop_scale=scale, job_examples=job_eval, batch_size=batch)
        row(f"evaluate ({comparison.examples} held-out, batch {batch})", eval_s, "eval",
            eval_s * scale * job_eval / max(1, comparison.examples),
            f"x{scale:.1f} FLOPs{f' x {job_eval}/{comparison.examples} examples' if job_eval != comparison.examples else ''}"
            f"; teacher + student forwards")

    total_measured = build_s + compress_s + sum(r["seconds"] for r in rows if r["phase"].startswith(("heal", "evaluate")))
    total_7b = compress_7b + sum(r["extrapolated_7b_seconds"] for r in rows if r["phase"].startswith(("heal", "evaluate")))
    rows.append({"phase": "total", "seconds": total_measured,
                 "peak_gpu_gib": max(meter.gpu.values(), default=None) if cuda else None,
                 "peak_rss_gib": max(meter.rss.values(), default=None),
                 "extrapolated_7b_seconds": total_7b, "note": "build + compress + heal + eval; 7B: no build"})

    record = {
        "shape": {k: v for k, v in shape.items() if k != "full_layers"}, "layers_built": L,
        "dtype": str(dtype).replace("torch.", ""), "device": args.device, "teacher_on": home,
        "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "loadavg": list(os.getloadavg()),
        "calib_sequences": args.calib, "seq_len": args.seq_len, "calib_tokens": calib_tokens, "keep": args.keep,
        "model_params": count_parameters(model), "layer_linear_params": layer_params,
        "per_layer_seconds": per_layer, "compress_timings": t, "phases": rows,
        "heal": heal_record, "eval": eval_record, "full_layers": n_full,
        "rss_per_phase": "VmHWM reset per phase" if meter.rss_resettable else "process peak (ru_maxrss)",
        "extrapolation": extrapolation_rule(n_full),
    }
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    print(f"model: random Mistral-shaped, {L} layer{'s' * (L > 1)}, hidden {shape['hidden_size']}, "
          f"MLP {shape['intermediate_size']}, heads {shape['num_attention_heads']}/{shape['num_key_value_heads']}, "
          f"vocab {shape['vocab_size']}, {record['dtype']} on {home}, compute on {args.device} "
          f"({record['device_name']}), torch {torch.__version__}, {record['threads']} threads, "
          f"load {' '.join(f'{x:.2f}' for x in record['loadavg'])}")
    print(f"calibration: {args.calib} sequences ({calib_tokens:,} tokens), whitened keep {args.keep}; "
          f"heal {args.heal_tokens:,} tokens at max_len {args.heal_max_len}; eval {args.eval} held-out examples")
    print_table(rows, cuda)
    if heal_record:
        print(f"heal: valid KL {heal_record['initial_valid']:.4g} -> {heal_record['best_valid']:.4g} "
              f"({heal_record['train_examples']} train / {heal_record['valid_examples']} valid examples, "
              f"{heal_record['trained_parameters'] / 1e6:.1f} M trained params)")
    if eval_record:
        print(f"eval: teacher {eval_record['teacher_loss']:.4f}, student {eval_record['student_loss']:.4f}, "
              f"Δ {eval_record['delta']:+.4f} nats/token, KL {eval_record['kl']:.4f}, "
              f"top-1 {eval_record['top1_agreement']:.3f} (random weights: the numbers only show it ran)")
    print("extrapolation: " + record["extrapolation"])
    print(f"peak RSS per phase: {record['rss_per_phase']}")
    if home != args.device and ("heal" in args.phases or "eval" in args.phases):
        print("note: --teacher-on cpu: heal and eval ran with the model moved to the GPU (1 layer fits; a 7B heal "
              "needs ~70 GB, eval of a 7B teacher + student needs device_map offload on 24 GB)")
    return 0


def extrapolation_rule(n_full: int) -> str:
    return (f"calibration/decomposition: measured per layer x {n_full} (+ embedding capture once); heal/eval: "
            f"measured x ({n_full}·F_layer + F_head)/(L·F_layer + F_head) with forward FLOPs per token F_layer = "
            "2·layer linear params + 2·hidden·max_len (attention at mean context max_len/2), F_head = 2·vocab·hidden, x job budget / measured "
            "budget (--job-heal-tokens, --job-eval)")


def print_table(rows: list[dict], cuda: bool) -> None:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    cells = [(r["phase"], fmt(r["seconds"], ".2f"), fmt(r["peak_gpu_gib"] if cuda else None, ".2f"),
              fmt(r["peak_rss_gib"], ".2f"), fmt(r["extrapolated_7b_seconds"], ".1f"), r["note"]) for r in rows]
    head = ("phase", "measured s", "peak GPU GiB", "peak RSS GiB", "extrapolated 7B s", "note")
    widths = [max(len(str(c[i])) for c in [head, *cells]) for i in range(len(head))]
    line = lambda c: "| " + " | ".join(str(x).ljust(w) if i in (0, 5) else str(x).rjust(w)  # noqa: E731
                                       for i, (x, w) in enumerate(zip(c, widths))) + " |"
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print(line(c))


if __name__ == "__main__":
    sys.exit(main())
