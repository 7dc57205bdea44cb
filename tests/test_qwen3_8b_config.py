"""Qwen3-8B from its published config alone (no weights): exact count and the profile's memory table of
``docs/7b-path.md`` (every number quoted there is checked here)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoConfig

from lowrank_core.allocate.memory import profile_memory
from lowrank_core.linears import count_parameters, linear_map, meta_model
from lowrank_core.cli import main

CONFIG = Path(__file__).parent / "fixtures" / "qwen3-8b-config.json"
HIDDEN, MLP, LAYERS, KV, VOCAB = 4096, 12288, 36, 1024, 151936
PER_LAYER = 2 * HIDDEN * HIDDEN + 2 * KV * HIDDEN + 3 * MLP * HIDDEN + 2 * HIDDEN + 2 * 128   # + norms, q/k norms
ORIGINAL = LAYERS * PER_LAYER + 2 * VOCAB * HIDDEN + HIDDEN                                   # untied head


@pytest.fixture(scope="module")
def model():
    return meta_model(AutoConfig.from_pretrained(str(CONFIG)))


def test_count_from_the_config_is_exact(model, capsys):
    assert ORIGINAL == 8_190_735_360 == count_parameters(model)
    assert main(["count", "--model", str(CONFIG), "--plan", "all:k0.8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["original"] == ORIGINAL and out["compressed"] == 6_800_151_552
    assert sum(r["params_after"] for r in out["matrices"]) == 5_555_183_616   # the factors healing trains
    rows = linear_map(model)
    assert len(rows) == LAYERS * 7 + 1 and not rows[-1].tied
    k = next(r for r in rows if r.name == "model.layers.0.self_attn.k_proj")
    assert (k.out_features, k.in_features) == (KV, HIDDEN)
    assert (rows[-1].out_features, rows[-1].in_features) == (VOCAB, HIDDEN)


def test_memory_table(model):
    m = profile_memory(model)
    gb = {k: round(v / 1e9, 2) for k, v in m.items() if k not in ("layers", "matrices")}
    assert m["gram_layer"] == (3 * HIDDEN ** 2 + MLP ** 2) * 8 and gb["gram_layer"] == 1.61
    assert gb["gram_all_layers"] == 57.98
    assert (gb["bases_float64"], gb["bases_float32"], gb["bases_layer_float64"]) == (24.77, 12.39, 0.69)
    assert m["factors_all_layers"] == LAYERS * HIDDEN ** 2 * 8 and gb["factors_all_layers"] == 4.83
    assert m["workspace"] == (2 * HIDDEN * MLP + 3 * HIDDEN ** 2) * 8 and gb["workspace"] == 1.21
    assert (gb["teacher"], gb["layer_weights"], gb["gradients"]) == (16.38, 0.39, 13.89)
    assert (gb["peak_gpu_teacher_on_gpu"], gb["peak_gpu_teacher_on_cpu"]) == (20.83, 4.41)
    assert gb["peak_cpu_bases"] == 29.6 and gb["all_at_once"] == 87.58
    assert round((m["bases_float32"] + m["factors_all_layers"]) / 1e9, 2) == 17.22
