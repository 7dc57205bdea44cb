"""Time the 7B path on one layer: layer-by-layer calibration + whitened decomposition of a random
Mistral-sized model (hidden 4096, MLP 14336, 32 query / 8 KV heads, a few layers) and extrapolate to the
32-layer Mistral-7B-OpenOrca job.

    python bench/gpu_check.py                      # CUDA, bf16, 2 layers, 64 x 512-token calibration
    python bench/gpu_check.py --tiny --device cpu  # the same code at toy sizes on CPU (minutes -> seconds)

It runs ``lowrank_core.compress.compress`` with ``layerwise=True`` (one decoder layer's Grams at a time,
float64 Gram and decomposition work, bf16 weights) on synthetic calibration text (random letters: the
cost does not depend on the content), and prints per-layer seconds, peak GPU memory and the
extrapolation. ``--teacher-on cpu`` keeps the model in CPU memory and moves one layer at a time to the
GPU, as for a real 7B teacher on a 24 GB card. A script that measures and prints, not a test.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import statistics
import string
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowrank_core.archmap import count_parameters, linear_map  # noqa: E402
from lowrank_core.compress import CompressSettings, compress  # noqa: E402
from lowrank_core.data import Example  # noqa: E402
from lowrank_core.models import tiny_tokenizer  # noqa: E402

MISTRAL = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=32002, full_layers=32)
TINY = dict(hidden_size=256, intermediate_size=896, num_attention_heads=8, num_key_value_heads=2,
            vocab_size=32002, full_layers=32)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="toy widths (hidden 256, MLP 896) for a CPU check")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32", "float16"),
                   help="weights dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers built (time is per layer)")
    p.add_argument("--calib", type=int, default=64, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--keep", type=float, default=0.8, help="keep fraction of every decoder linear")
    p.add_argument("--teacher-on", default=None, choices=("cpu", "device"),
                   help="where the model lives (default: on the compute device)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


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
    return model.eval()


def synthetic_examples(n: int, seq_len: int) -> list:
    """Chat examples of random letters; with the byte-level tiny tokenizer 1 character = 1 token."""
    rng = random.Random(0)
    letters = string.ascii_lowercase + " "
    text = lambda k: "".join(rng.choice(letters) for _ in range(k))  # noqa: E731
    return [Example(system="", user=text(seq_len // 4), answer=text(seq_len)) for _ in range(n)]


class LayerClock:
    """Progress callback recording the wall time at which each decoder layer finishes."""

    def __init__(self):
        self.start = time.perf_counter()
        self.marks: list[float] = []

    def __call__(self, done, total, message=""):
        if message.startswith("layer "):
            self.marks.append(time.perf_counter())

    def per_layer(self) -> list[float]:
        times = [self.start] + self.marks
        return [b - a for a, b in zip(times, times[1:])]


def main(argv=None) -> int:
    args = parse_args(argv)
    shape = TINY if args.tiny else MISTRAL
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; run with --device cpu (and --tiny for a quick check)")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    home = "cpu" if args.teacher_on == "cpu" else args.device
    model = build_model(shape, args.layers, dtype, home)
    tokenizer = tiny_tokenizer()
    examples = synthetic_examples(args.calib, args.seq_len)
    layer_params = sum(li.params for li in linear_map(model) if li.layer == 0)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    settings = CompressSettings(method="whitened", calib=args.calib, max_len=args.seq_len + 64, batch_size=4,
                                layerwise=True, device=args.device, offload=(home == "cpu"), hidden_mse=True)
    plan = {"rules": [{"layers": "all", "modules": ["all"], "keep": args.keep}]}
    clock = LayerClock()
    result = compress(model, tokenizer, plan, examples, settings, progress=clock)
    if cuda:
        torch.cuda.synchronize()
    total = time.perf_counter() - clock.start
    per_layer = clock.per_layer()
    fixed = max(0.0, total - sum(per_layer))   # after the last layer: head, student assembly
    steady = per_layer[1:] or per_layer
    layer_s = statistics.median(steady)
    n_full = shape["full_layers"]
    record = {
        "shape": {k: v for k, v in shape.items() if k != "full_layers"}, "layers_built": args.layers,
        "dtype": str(dtype).replace("torch.", ""), "device": args.device, "teacher_on": home,
        "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__, "calib_sequences": args.calib, "seq_len": args.seq_len,
        "calib_tokens": result.split.get("fit_tokens", 0) + result.split.get("held_out_tokens", 0),
        "keep": args.keep, "model_params": count_parameters(model), "layer_linear_params": layer_params,
        "per_layer_seconds": per_layer, "layer_seconds": layer_s, "total_seconds": total,
        "timings": result.timings,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
        "extrapolated_full_seconds": layer_s * n_full + fixed,
        "full_layers": n_full,
    }
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    print(f"model: random Mistral-shaped, {args.layers} layers, hidden {shape['hidden_size']}, "
          f"MLP {shape['intermediate_size']}, heads {shape['num_attention_heads']}/{shape['num_key_value_heads']}, "
          f"{record['dtype']} on {home}, compute on {args.device} ({record['device_name']}), torch {torch.__version__}")
    print(f"calibration: {args.calib} sequences x ~{args.seq_len} tokens ({record['calib_tokens']} tokens), "
          f"whitened keep {args.keep}")
    print("per-layer seconds: " + ", ".join(f"{s:.2f}" for s in per_layer))
    print(f"steady layer: {layer_s:.2f} s   total: {total:.2f} s   timings: "
          + ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items()))
    if cuda:
        print(f"peak GPU memory allocated: {record['peak_gpu_gib']:.2f} GiB")
    print(f"peak resident memory (process): {record['peak_rss_gib']:.2f} GiB")
    print(f"extrapolated {n_full}-layer job: {record['extrapolated_full_seconds'] / 60:.1f} min "
          f"({n_full} x {layer_s:.2f} s + {fixed:.1f} s fixed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
