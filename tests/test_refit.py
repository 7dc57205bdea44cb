"""Block-level refit: lowers the held-out block loss from its whitened start, keeps the best, touches no teacher tensor."""
from __future__ import annotations

import pytest
import torch

from lowrank_core import layerwise as lw
from lowrank_core.compress import CompressSettings, compress
from lowrank_core.layerwise import gram_pass
from lowrank_core.data import calibration_batches
from lowrank_core.data import make_split
from lowrank_core.decompose import whitened_factors
from lowrank_core.lowrank import LowRankLinear
from lowrank_core.models import tiny_model
from lowrank_core.methods.refit import BlockObjective, RefitSettings, factor_parameters, refit_layer
from lowrank_core.student import build_student, changed_tensors, state_checksums


@pytest.fixture(scope="module")
def setup():
    """Layer 0 of a tiny Llama, its MLP factorised (whitened, rank 8), with train/valid batches."""
    torch.manual_seed(0)
    model, tok = tiny_model("llama", layers=2)
    examples = make_split("chatterbot", n_calib=16, n_eval=0).calib
    batches = calibration_batches(tok, examples, batch_size=4, max_len=64)
    inputs = lw.capture_layer_inputs(model, batches)
    layer = lw.decoder_layers(model)[0]
    targets = lw.run_layer(layer, inputs, 0)
    names = {"mlp.gate_proj": "mlp_in", "mlp.down_proj": "down_in"}
    _, stats, _ = gram_pass(layer, inputs, 0, inputs.hidden, names, list(range(len(batches))), "cpu", False)
    grams = {}
    for name, key in (("gate_proj", "mlp_in"), ("up_proj", "mlp_in"), ("down_proj", "down_in")):
        w = getattr(layer.mlp, name).weight.detach()
        grams[name] = LowRankLinear.from_factors(whitened_factors(w, stats[key], 8))
    return model, layer, inputs, targets, grams


def _run(setup, target="block", steps=40):
    model, layer, inputs, targets, factors = setup
    new = {f"mlp.{n}": LowRankLinear.from_factors(m.factors()) for n, m in factors.items()}
    student = build_student(layer, new)
    objective = BlockObjective(student, 0, target, inputs, targets, "cpu", teacher_layer=layer,
                               teacher_inputs=inputs, names=list(new))
    params = factor_parameters(new)
    n = len(inputs.hidden)
    settings = RefitSettings(steps=steps, lr=3e-3, batch_tokens=256, patience=3, target=target)
    curve = refit_layer(objective, params, list(range(n - 1)), [n - 1], settings)
    return model, objective, curve


@pytest.mark.parametrize("target", ["block", "matrix"])
def test_refit_lowers_valid_loss_and_keeps_best(setup, target):
    model, objective, curve = _run(setup, target)
    assert curve["best_valid"] < curve["initial_valid"] * 0.9
    assert curve["best_valid"] == min(curve["valid"])
    assert len(curve["train"]) == curve["steps"] > 0 and curve["eval_steps"][0] == 0
    n = len(objective.inputs.hidden)
    assert objective.mean_loss([n - 1]) == pytest.approx(curve["best_valid"], rel=1e-5)


def test_refit_touches_no_teacher_tensor(setup):
    model = setup[0]
    snap = state_checksums(model)
    assert any(p.requires_grad for p in model.parameters())  # tiny models leave requires_grad on
    _run(setup, steps=5)
    assert changed_tensors(model, snap) == []
    assert all(p.grad is None for p in model.parameters())


def test_refit_settings_validation():
    with pytest.raises(ValueError, match="unknown refit target 'kl'"):
        RefitSettings(target="kl").validate()
    with pytest.raises(ValueError, match="unknown refit target 'logits'; allowed: block, matrix"):
        RefitSettings(target="logits").validate()  # never implemented: no longer offered
    with pytest.raises(ValueError, match="lr"):
        RefitSettings(lr=0).validate()
    with pytest.raises(ValueError, match="valid_fraction"):
        CompressSettings(valid_fraction=1.5).validate()


def test_sequential_refit_beats_whitened_on_block_outputs():
    """End to end: the refit student's held-out hidden-state error is below the whitened student's."""
    model, tok = tiny_model("llama", layers=2)
    examples = make_split("chatterbot", n_calib=16, n_eval=0).calib
    common = dict(calib=16, max_len=64, batch_size=4, layerwise=True)
    white = compress(model, tok, "all:k0.4", examples, CompressSettings(method="whitened", **common))
    refit = compress(model, tok, "all:k0.4", examples,
                     CompressSettings(method="refit",
                                      method_settings={"refit": RefitSettings(steps=30, lr=3e-3, batch_tokens=256)},
                                      **common))
    for w, r in zip(white.hidden_mse, refit.hidden_mse):
        assert r["mse"] < w["mse"]
    for curve in refit.refit_curves.values():
        assert curve["best_valid"] < curve["initial_valid"]
