"""The decoder-layer-by-layer runner reproduces the full model exactly and leaves the teacher alone."""
from __future__ import annotations

import pytest
import torch

from lowrank_core import layerwise as lw
from lowrank_core.arch import ARCHS, arch_of
from lowrank_core.models import tiny_model




def _batches():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 250, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    ids2 = torch.randint(0, 250, (2, 7), generator=g)
    return [{"input_ids": ids, "attention_mask": mask},
            {"input_ids": ids2, "attention_mask": torch.ones(2, 7, dtype=torch.long)}]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_layer_by_layer_reproduces_full_model(arch):
    """Also SmolLM3's rope-less layers and Granite's in-layer residual multiplier and scaled logits."""
    model, _ = tiny_model(arch, layers=3)
    batches = _batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = lw.capture_layer_inputs(model, batches)
    assert len(inputs.hidden) == 2 and inputs.tokens == 12 + 8 + 5 + 14
    hidden = inputs.hidden
    for i, layer in enumerate(lw.decoder_layers(model)):
        hidden = lw.run_layer(layer, inputs, i, hidden=hidden)
    with torch.no_grad():
        for b, batch in enumerate(batches):
            ref = model(**batch, output_hidden_states=True)
            real = batch["attention_mask"].bool()
            logits = arch_of(model).logits_of(model, lw.final_norm(model)(hidden[b]))  # head + soft-cap
            assert torch.equal(logits[real], ref.logits[real])
            assert torch.equal(lw.final_norm(model)(hidden[b])[real], ref.hidden_states[-1][real])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_kwargs_shared_across_layers_and_hidden_stored_on_request():
    model, _ = tiny_model("llama", layers=3)
    inputs = lw.capture_layer_inputs(model, _batches()[:1], store_device="cpu")
    kws = inputs.layer_kwargs[0]
    assert len(kws) == 3 and kws[0] is kws[1] is kws[2]
    assert "position_embeddings" in kws[0] and "cache" not in kws[0]
    assert inputs.hidden[0].device.type == "cpu"
    assert inputs.masks[0].dtype == torch.bool and inputs.masks[0].sum() == 12 + 8 + 5


def test_layer_on_copies_only_across_devices():
    model, _ = tiny_model("llama", layers=1)
    layer = lw.decoder_layers(model)[0]
    assert lw.layer_on(layer, "cpu") is layer
    if torch.cuda.is_available():
        moved = lw.layer_on(layer, "cuda")
        assert moved is not layer and next(layer.parameters()).device.type == "cpu"


def test_hidden_mse_ignores_padding():
    a = torch.zeros(1, 4, 2)
    b = torch.zeros(1, 4, 2)
    b[0, 3] = 100.0  # a padding position: must not count
    b[0, 0] = 1.0
    mask = torch.tensor([[True, True, True, False]])
    out = lw.hidden_mse([a], [b], [mask], width=2)
    assert out["tokens"] == 3
    assert out["mse"] == pytest.approx(2.0 / 6)
    assert out["rel_mse"] == pytest.approx(1.0)


def test_model_without_decoder_layers_is_rejected():
    with pytest.raises(ValueError, match="unsupported architecture: model_type=None"):
        lw.decoder_layers(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------- the one layer-by-layer loop
def test_walk_layers_streams_share_teacher_passes_and_replacements_change_only_their_stream(monkeypatch):
    """Two names given the same batches start as one list: the teacher layer runs once per layer for both
    until the callback gives the student its own outputs (a replaced linear in layer 1); from there on both
    are walked, the teacher stream still equals the full model and the student stream differs."""
    from lowrank_core.lowrank import LowRankLinear
    from lowrank_core.decompose import svd_factors

    model, _ = tiny_model("llama", layers=3)
    batches = _batches()
    calls, seen = [], []
    run = lw.run_layer

    def counting(layer, inputs, index, **kw):
        calls.append(index)
        return run(layer, inputs, index, **kw)

    monkeypatch.setattr(lw, "run_layer", counting)
    proj = lw.decoder_layers(model)[1].mlp.down_proj
    low = LowRankLinear.from_factors(svd_factors(proj.weight.detach(), 4))

    def visit(step):
        seen.append((step.index, step.same("teacher", "student"), step.prefix))
        assert step.layer is lw.decoder_layers(model)[step.index] and step.work is not step.layer
        if step.index == 1:
            return {"student": step.run("student", {"mlp.down_proj": low})}
        return None

    out = lw.walk_layers(model, {"teacher": batches, "student": batches}, visit)
    assert seen == [(0, True, "model.layers.0."), (1, True, "model.layers.1."), (2, False, "model.layers.2.")]
    assert calls == [0, 1, 1, 2, 2]       # one shared pass at layer 0, then the student's own
    with torch.no_grad():
        for b, batch in enumerate(batches):
            ref = model(**batch, output_hidden_states=True).hidden_states[-1]
            real = batch["attention_mask"].bool()
            assert torch.equal(lw.final_norm(model)(out["teacher"][b])[real], ref[real])
            assert not torch.equal(out["student"][b][real], out["teacher"][b][real])


def test_walk_layers_drops_a_stream_and_stops_where_asked():
    model, _ = tiny_model("llama", layers=3)
    inputs = lw.capture_layer_inputs(model, _batches())
    visited = []

    def visit(step):
        visited.append((step.index, sorted(step.hidden)))
        fit, held = step.grams("a", {"mlp.gate_proj": "mlp_in"}, [0], keep_outputs=True)
        assert fit["mlp_in"].tokens == 12 + 8 + 5 and held["mlp_in"].tokens == 14
        return {"b": None} if step.index == 0 else None

    out = lw.walk_layers(model, {"a": inputs, "b": lw.capture_layer_inputs(model, _batches())}, visit, layers=2)
    assert visited == [(0, ["a", "b"]), (1, ["a"])] and list(out) == ["a"]
    expected = inputs.hidden
    for i, layer in enumerate(lw.decoder_layers(model)[:2]):
        expected = lw.run_layer(layer, inputs, i, hidden=expected)
    assert all(torch.equal(x, y) for x, y in zip(out["a"], expected))


def test_an_advanced_stream_lets_its_entering_states_go_before_the_step_ends():
    """What the profile's memory rests on: after ``advance`` nothing of the walk holds the states that
    entered the layer (layer 1's inputs: layer 0's outputs, the captured inputs stay with LayerInputs)."""
    import gc
    import weakref

    model, _ = tiny_model("llama", layers=3)
    alive = []

    def visit(step):
        ref = weakref.ref(step.hidden["a"][0])
        step.advance("a", step.output("a"))
        gc.collect()
        alive.append(ref() is not None)
        with pytest.raises(ValueError, match="already advanced"):
            step.advance("a", None)

    lw.walk_layers(model, {"a": _batches()}, visit)
    assert alive == [True, False, False]
