"""The reference for calibration speed: SVD-LLM(W) done plainly, as its official recipe does it.

    python bench/svdllm_plain.py [--calib 64] [--max-len 512] [--keep 0.8] [--threads 2]

A re-implementation (not a copy) of the official recipe's steps, on the same examples and tokens as
``lowrank_core compress``: a forward pre-hook on every decoder linear, each adding its own float32
``xᵀx`` (so q/k/v and gate/up each repeat the product of a shared input), one sequence per forward of
the whole model; then per matrix a float64 Cholesky factor ``S`` of its Gram (an eigenvalue shift when
it is not positive definite), ``W·S`` and its SVD in float32, ``S⁻¹`` by ``torch.linalg.inv``, and the
factors ``U√Σ``, ``√Σ Vᵀ S⁻¹`` at the rank ``floor(keep·out·in/(out+in))``. Prints the phase times, the
mean relative output error and the peak resident memory. ``bench/calibration_race.py`` runs it as a
whole process against the engine. A script that measures and prints, not a test.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", type=int, default=64)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--keep", type=float, default=0.8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default="default")
    p.add_argument("--model", default="default")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    from lowrank_core.data import calibration_batches, make_split
    from lowrank_core.models import load_model

    loaded = load_model(args.model, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    examples = make_split(args.data, n_calib=args.calib, n_eval=0).calib[: args.calib]
    # the very token sequences compress calibrates on (each example cut to max_len), one per forward
    sequences = [b["input_ids"] for b in calibration_batches(tok, examples, 1, args.max_len)]
    t_load = time.perf_counter() - start

    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n}
    grams = {n: torch.zeros(m.in_features, m.in_features) for n, m in linears.items()}

    def make_hook(name):
        def hook(module, inputs):
            x = inputs[0].detach().float()
            grams[name] += (x.transpose(1, 2) @ x).sum(0)
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in linears.items()]
    t = time.perf_counter()
    with torch.no_grad():
        for ids in sequences:
            model(input_ids=ids)
    for h in handles:
        h.remove()
    t_profile = time.perf_counter() - t

    t = time.perf_counter()
    errors = []
    with torch.no_grad():
        for name, m in linears.items():
            g = grams[name].double()
            try:
                s = torch.linalg.cholesky(g)
            except torch.linalg.LinAlgError:
                shift = -torch.linalg.eigvalsh(g)[0] + 1e-6
                s = torch.linalg.cholesky(g + shift * torch.eye(g.shape[0], dtype=g.dtype))
            s = s.float()
            W = m.weight.float()
            u, sigma, vt = torch.linalg.svd(W @ s, full_matrices=False)
            s_inv = torch.linalg.inv(s)
            rank = int(args.keep * W.shape[0] * W.shape[1] / (W.shape[0] + W.shape[1]))
            root = sigma[:rank].sqrt()
            up, down = u[:, :rank] * root, (root[:, None] * vt[:rank]) @ s_inv
            diff = (W - up @ down).double()
            errors.append(float(torch.trace(diff @ grams[name].double() @ diff.T)
                                / torch.trace(W.double() @ grams[name].double() @ W.double().T)))
    t_svd = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print(f"svdllm-plain: {len(sequences)} sequences, {sum(int(s.shape[1]) for s in sequences)} tokens, "
          f"{len(linears)} linears; load {t_load:.1f} s, profiling {t_profile:.1f} s, whitening + SVD {t_svd:.1f} s, "
          f"total {time.perf_counter() - start:.1f} s; mean rel. output error {sum(errors) / len(errors):.4f}; "
          f"peak RSS {peak:.2f} GB; threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
