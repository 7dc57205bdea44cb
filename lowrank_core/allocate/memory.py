"""Memory of a rank-allocation profile, from shapes alone (the ``docs/7b-path.md`` table).

``profile_memory(model)`` counts, for the eligible decoder linears of ``model`` (a real model or
``linears.meta_model(config)``: no weights needed), the bytes each phase of :func:`~.profile.build_profile`
holds. Formulas (``n_k``: the input width of Gram key ``k``; ``m = min(out, in)`` per matrix):

- one layer's Grams: ``Σ_k n_k² · 8`` (float64; q/k/v share one, gate/up share one);
- a stored basis: ``m² · b + m · 8`` (eigenvectors in the stored dtype, ``b`` = 8 or 4, values float64);
- a tall matrix's (``out > in``) Gram factor ``L``: ``in² · 8`` per shared input (gate/up: one per layer);
- a hidden stream: ``tokens · hidden · a`` (``a``: activation bytes, 2 in bf16);
- decomposition workspace of the largest matrix: ``(2 · out · in + 3 · m²) · 8`` (float64 copy of ``W``,
  ``W·G`` or ``W·L``, the ``m²`` eigenproblem and its eigenvectors);
- the probe replacements of one layer: ``Σ r_probe · (out + in) · a``;
- the gradient probe's gradients (one example, every scored weight): ``Σ out · in · a``.
"""
from __future__ import annotations

from ..linears import linear_map
from ..plan import rank_for_keep
from .profile import ELIGIBLE

F64 = 8


def profile_memory(model, calib_tokens: int = 64 * 512, val_tokens: int = 32 * 256, weight_bytes: int = 2,
                   basis_bytes: int = 8, probe_keep: float = 0.5, modules=ELIGIBLE) -> dict:
    """Bytes per phase of the layer-by-layer profile and of the former all-at-once one (see module doc).
    ``calib_tokens`` / ``val_tokens``: calibration and validation tokens; ``weight_bytes``: the teacher's
    (and hidden states') bytes per element; ``basis_bytes``: 8 (float64 bases) or 4 (float32)."""
    infos = [li for li in linear_map(model) if li.layer is not None and li.module in modules]
    layers = sorted({li.layer for li in infos})
    hidden = int(model.config.hidden_size)
    per_layer = {i: [li for li in infos if li.layer == i] for i in layers}

    def grams(group):
        return sum(n * n * F64 for n in {li.gram_key: li.in_features for li in group}.values())

    def factors(group):
        return sum(n * n * F64 for n in {li.gram_key: li.in_features for li in group
                                         if li.out_features > li.in_features}.values())

    def bases(group, b):
        return sum(min(li.out_features, li.in_features) ** 2 * b + min(li.out_features, li.in_features) * F64
                   for li in group)

    gram_layer = max(grams(g) for g in per_layer.values())
    workspace = max((2 * li.out_features * li.in_features + 3 * min(li.out_features, li.in_features) ** 2) * F64
                    for li in infos)
    probe = max(sum(rank_for_keep(li, probe_keep) * (li.out_features + li.in_features) * weight_bytes for li in g)
                for g in per_layer.values())
    layer_weights = max(sum(li.params for li in g) * weight_bytes for g in per_layer.values())
    teacher = sum(p.numel() for p in model.parameters()) * weight_bytes
    out = {
        "layers": len(layers), "matrices": len(infos),
        "gram_layer": gram_layer, "gram_all_layers": sum(grams(g) for g in per_layer.values()),
        "bases_float64": sum(bases(g, 8) for g in per_layer.values()),
        "bases_float32": sum(bases(g, 4) for g in per_layer.values()),
        "bases_layer_float64": max(bases(g, 8) for g in per_layer.values()),
        "factors_layer": max(factors(g) for g in per_layer.values()),
        "factors_all_layers": sum(factors(g) for g in per_layer.values()),
        "calib_stream": calib_tokens * hidden * weight_bytes,
        "val_stream": val_tokens * hidden * weight_bytes,
        "workspace": workspace, "probe_modules_layer": probe, "layer_weights": layer_weights, "teacher": teacher,
    }
    stored = out["bases_float64"] if basis_bytes == 8 else out["bases_float32"]
    streams = 2 * out["calib_stream"] + 4 * out["val_stream"]   # calibration in/out, validation in/out/probe/suffix
    # a layer's Grams are dropped before its probes run: the peak is the larger of the two phases
    out["gram_phase"] = out["gram_layer"] + out["factors_layer"] + workspace + out["bases_layer_float64"]
    out["probe_phase"] = out["bases_layer_float64"] + out["factors_layer"] + probe
    layer_peak = max(out["gram_phase"], out["probe_phase"])
    out["peak_gpu_teacher_on_gpu"] = teacher + layer_peak + streams
    out["peak_gpu_teacher_on_cpu"] = 2 * layer_weights + layer_peak   # the layer (+ a suffix layer); streams on CPU
    out["peak_cpu_bases"] = stored + out["factors_all_layers"]
    out["all_at_once"] = out["gram_all_layers"] + out["factors_all_layers"] + out["bases_float64"]
    eligible = sum(li.params for li in infos)
    out["gradients"] = eligible * weight_bytes    # one example's gradients of every scored weight at once
    return out
