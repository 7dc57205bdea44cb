"""The architecture table: every entry gives a tiny model whose linears, layers, norm and head the
engine finds through it, compresses layer by layer and scores with the head on answer tokens only."""
from __future__ import annotations

import pytest
import torch

from lowrank_core.arch import ARCHS, UnsupportedArchitectureError, arch_of, all_module_names
from lowrank_core.linears import linear_map
from lowrank_core.compress import CompressSettings, compress
from lowrank_core.data import iter_batches, make_split
from lowrank_core.evaluate import answer_loss_sum
from lowrank_core.layerwise import decoder_layers, final_norm
from lowrank_core.models import TINY_SOURCES, load_config, tiny_model


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_every_entry_maps_compresses_and_scores_a_tiny_model(model_type):
    model, tok = tiny_model(model_type)
    spec = arch_of(model)
    assert spec is ARCHS[model_type] and f"tiny-{model_type}" in TINY_SOURCES
    assert load_config(f"tiny-{model_type}").model_type == model_type
    linears = linear_map(model)
    n_layers = len(decoder_layers(model))
    per_layer = [_linears_of(spec, layer) for layer in decoder_layers(model)]
    assert len(linears) == sum(per_layer) + 1
    for info in linears:
        module = model.get_submodule(info.name)
        assert isinstance(module, torch.nn.Linear) and tuple(module.weight.shape) == (info.out_features, info.in_features)
    head = linears[-1]
    assert head.name == spec.head and head.layer is None and head.tied == spec.tied(model.config)
    # inputs shared by the table's groups: one Gram key per distinct input of a layer
    keys = {li.gram_key for li in linears if li.layer == 0}
    experts = spec.experts_of(decoder_layers(model)[0])
    dense = {spec.inputs[m] for m in spec.decoder_modules if experts is None or m not in spec.expert_linears}
    assert len(keys) == len(dense) + (0 if experts is None else len(experts) * len(set(spec.expert_linears.values())))
    assert final_norm(model) is spec.final_norm(model)

    split = make_split("chatterbot", n_calib=6, n_eval=4, seed=0)
    result = compress(model, tok, "all:k0.5", split.calib, CompressSettings(calib=6, max_len=64, layerwise=True))
    assert len(result.layers) == sum(per_layer) and result.split["path"] == "layerwise"
    # the plain-head fast path of the evaluation equals the full model's logits
    batch = next(iter_batches(tok, split.eval, batch_size=2, max_len=64))
    with torch.no_grad():
        total, n = answer_loss_sum(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    ref = torch.nn.functional.cross_entropy(logits[targets != -100].float(), targets[targets != -100], reduction="sum")
    assert n == int((targets != -100).sum()) and total == pytest.approx(float(ref), rel=1e-5)


def _linears_of(spec, layer) -> int:
    """Plan matrices of one decoder layer: the table's linears, each expert's linears in a MoE layer."""
    experts = spec.experts_of(layer)
    if experts is None:
        return len(spec.decoder_modules)
    return len(spec.decoder_modules) - len(spec.expert_linears) + len(experts) * len(spec.expert_linears)


def test_unknown_model_type_is_refused_naming_the_supported_ones():
    config = type("Config", (), {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})()
    with pytest.raises(UnsupportedArchitectureError, match="model_type='gpt2'.*supported model types: llama"):
        arch_of(config)
    assert arch_of(config, strict=False) is None


def test_factorized_export_model_type_resolves_to_its_base():
    config = type("Config", (), {"model_type": "lowrank_qwen2", "lowrank_base_model_type": "qwen2"})()
    assert arch_of(config) is ARCHS["qwen2"]


def test_plan_module_names_come_from_the_table():
    names = all_module_names()
    for spec in ARCHS.values():
        assert set(spec.decoder_modules) <= set(names) and spec.head_module in names
