"""Gemma 2 and Gemma 3 text: the engine's shortcuts (head on answer positions, layer by layer) give the
model's own logits — soft-capped, with sliding-window layers and per-kind rope —, head_dim != hidden /
heads is read from the weights, the tied head behaves as Llama's, and the whole tool runs on both."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lowrank_core import layerwise as lw
from lowrank_core.allocate.gradient import example_loss
from lowrank_core.arch import ARCHS, arch_of
from lowrank_core.linears import count_parameters, linear_map
from lowrank_core.cli import main
from lowrank_core.compare import score_batch
from lowrank_core.data import Example, iter_batches
from lowrank_core.evaluate import answer_loss_from_hidden, answer_loss_sum, answer_positions, logits_at
from lowrank_core.export import export_student, load_factorized
from lowrank_core.models import tiny_model
from lowrank_core.plan import account
from test_export import lm_loss, make_student, reload_isolated

GEMMAS = [t for t in ARCHS if t.startswith("gemma")]


def padded_batch(tok):
    examples = [Example("", "Hi", "Hello there."), Example("Be brief.", "What is a window?", "A local span."),
                Example("", "Tell me about sliding attention in a few words", "Each token sees its last few.")]
    batch = next(iter_batches(tok, examples, batch_size=3, max_len=128))
    assert not bool(batch["attention_mask"].all()) and batch["input_ids"].shape[1] > 4 * 2  # padding, > window
    return batch


def full_logits(model, batch):
    mask = batch["attention_mask"]
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=mask,
                     position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits


def test_both_families_are_in_the_table_and_multimodal_gemma3_is_refused():
    from transformers import Gemma3Config

    from lowrank_core.arch import UnsupportedArchitectureError

    assert GEMMAS == ["gemma2", "gemma3_text"]
    with pytest.raises(UnsupportedArchitectureError, match="model_type='gemma3'.*supported model types: .*gemma3_text"):
        arch_of(Gemma3Config())


@pytest.mark.parametrize("arch", GEMMAS)
def test_soft_capped_fast_path_equals_the_models_logits(arch):
    """logits_at (scoring, healing, compare), answer_loss_from_hidden (allocation) and example_loss
    (gradient scores) apply the table's soft-cap: the model's logits; the raw head would not be."""
    model, tok = tiny_model(arch)
    spec = arch_of(model)
    assert spec.softcap(model.config) == 0.2
    batch = padded_batch(tok)
    _, selected, positions = answer_positions(batch)
    ref = full_logits(model, batch)[positions]
    with torch.no_grad():
        fast = logits_at(model, batch, positions)
        mask = batch["attention_mask"]
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=mask,
                             position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
        raw = model.lm_head(hidden[positions])
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    assert (raw - ref).abs().max() > 0.05  # the cap bites on the tiny model: a missing cap would fail above
    targets = batch["labels"][:, 1:][selected]
    ce = float(F.cross_entropy(ref.float(), targets, reduction="sum"))
    with torch.no_grad():
        assert answer_loss_sum(model, batch)[0] == pytest.approx(ce, rel=1e-5)
        assert answer_loss_from_hidden(model, hidden, batch["labels"])[0] == pytest.approx(ce, rel=1e-5)
        row = batch["attention_mask"][0].bool()
        one = example_loss(model, batch["input_ids"][:1, row], batch["labels"][:1, row])
        ref_one = F.cross_entropy(full_logits(model, {k: v[:1, row] for k, v in batch.items()})[0, :-1],
                                  batch["labels"][0, row][1:], reduction="sum", ignore_index=-100)
    assert float(one) == pytest.approx(float(ref_one), rel=1e-5)


@pytest.mark.parametrize("arch", GEMMAS)
def test_compare_kl_and_top1_use_the_models_logits(arch):
    teacher, tok = tiny_model(arch)
    student = make_student(teacher, "all:r4")
    batch = padded_batch(tok)
    targets, selected, positions = answer_positions(batch)
    with torch.no_grad():
        got = score_batch(teacher, {"s": student}, batch)
    t_logp = F.log_softmax(full_logits(teacher, batch)[positions], -1)
    s_logp = F.log_softmax(full_logits(student, batch)[positions], -1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum()
    agree = int((t_logp.argmax(-1) == s_logp.argmax(-1)).sum())
    assert sum(got["s"]["kl"]) == pytest.approx(float(kl), rel=1e-4, abs=1e-7)
    assert sum(got["s"]["agree"]) == agree
    assert sum(got["teacher"]) == pytest.approx(float(-t_logp.gather(1, targets[selected][:, None]).sum()), rel=1e-5)


@pytest.mark.parametrize("arch", GEMMAS)
def test_layer_runner_gives_each_layer_its_mask_and_rope(arch):
    """Layers 0, 2 slide (window 4), layer 1 is global; each gets the mask (and, Gemma 3, the rope) the
    model gives it, so running layer by layer reproduces the full forward on sequences past the window."""
    model, tok = tiny_model(arch, layers=3)
    assert model.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    batches = [padded_batch(tok)]
    inputs = lw.capture_layer_inputs(model, batches)
    kw = inputs.layer_kwargs[0]
    assert kw[0] is kw[2] and kw[0] is not kw[1]
    assert not torch.equal(kw[0]["attention_mask"], kw[1]["attention_mask"])
    same_rope = all(torch.equal(a, b) for a, b in zip(kw[0]["position_embeddings"], kw[1]["position_embeddings"]))
    assert same_rope == (arch == "gemma2")  # Gemma 3: local and global rope bases differ
    hidden = inputs.hidden
    for i, layer in enumerate(lw.decoder_layers(model)):
        hidden = lw.run_layer(layer, inputs, i, hidden=hidden)
    spec = arch_of(model)
    real = batches[0]["attention_mask"].bool()
    with torch.no_grad():
        ref = full_logits(model, batches[0])
        ours = spec.logits_of(model, spec.final_norm(model)(hidden[0]))
        torch.testing.assert_close(ours[real], ref[real], rtol=1e-5, atol=1e-6)
        # the window bites: layer 0 with the global layer's kwargs gives other outputs
        wrong = lw.call_layer(lw.decoder_layers(model)[0], inputs.hidden[0], kw[1])
        right = lw.call_layer(lw.decoder_layers(model)[0], inputs.hidden[0], kw[0])
    assert (wrong - right)[real].abs().max() > 1e-4


@pytest.mark.parametrize("arch", GEMMAS)
def test_head_dim_and_tied_head(arch, capsys):
    model, _ = tiny_model(arch)
    cfg = model.config
    assert cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size  # 24 x 4 = 96 vs 64
    shapes = {i.module: (i.out_features, i.in_features) for i in linear_map(model) if i.layer == 0}
    assert shapes["q_proj"] == (96, 64) and shapes["k_proj"] == (48, 64) and shapes["o_proj"] == (64, 96)
    head = linear_map(model)[-1]
    assert head.name == "lm_head" and head.tied and model.lm_head.weight is model.model.embed_tokens.weight
    acc = account(cfg, "all:r8; lm_head:r8")
    assert acc.original == model.num_parameters()
    assert any("lm_head is tied" in w for w in acc.warnings)
    assert main(["count", "--model", f"tiny-{arch}", "--plan", "all:r8", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["original"] == model.num_parameters()
    assert printed["compressed"] == count_parameters(make_student(model, "all:r8"))


@pytest.mark.parametrize("arch", GEMMAS)
def test_exports_reload_with_the_students_logits(tmp_path, arch):
    """Dense in plain transformers; factorized (tied head factorised too) through trust_remote_code and
    through lowrank_core: each gives the student's logits; both load where lowrank_core cannot be imported."""
    from transformers import AutoModelForCausalLM

    teacher, tok = tiny_model(arch)
    student = make_student(teacher, "all:r4; lm_head:r8")
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        want = student(input_ids=ids).logits
    paths = {}
    for fmt in ("dense", "factorized"):
        result = export_student(student, tok, tmp_path / fmt, fmt)
        assert result.verified and result.max_logit_diff < 1e-5
        paths[fmt] = result.path
    reloaded = {"dense": AutoModelForCausalLM.from_pretrained(paths["dense"]),
                "remote": AutoModelForCausalLM.from_pretrained(paths["factorized"], trust_remote_code=True),
                "lowrank_core": load_factorized(paths["factorized"]).model}
    assert type(reloaded["dense"]).__name__ == ARCHS[arch].hf_model
    for name, model in reloaded.items():
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5, msg=name)
    out = reload_isolated(tmp_path, {fmt: {"path": path, "remote": fmt == "factorized"} for fmt, path in paths.items()},
                          ids)
    assert not out["lowrank_loaded"] and out["factorized"]["class"] == "LowRankForCausalLM"
    for fmt in paths:
        assert out[fmt]["loss"] == pytest.approx(lm_loss(student, ids), abs=1e-5)


@pytest.mark.parametrize("arch", GEMMAS)
def test_the_whole_cli_runs_on_tiny_gemma(tmp_path, arch, capsys):
    """spectrum, compress with every method (healed, evaluated, exported), search and compare."""
    from lowrank_core import methods

    model = f"tiny-{arch}"
    common = ["--model", model, "--data", "chatterbot", "--calib", "6", "--max-len", "48"]
    assert main(["spectrum", "--model", model, "--module", "q_proj", "--layer", "1"]) == 0
    for method in methods.names():
        argv = ["compress", *common, "--eval", "2", "--plan", "all:r8", "--method", method, "--refit-steps", "2",
                "--heal-tokens", "200", "--heal-examples", "4", "--heal-max-len", "48", "--json"]
        if method == "whitened":
            argv += ["--export", str(tmp_path / "student"), "--format", "factorized"]
        if method == "svd":
            argv += ["--heal-train-norms"]  # the student's own copies of Gemma's (1 + w) norms
        capsys.readouterr()
        assert main(argv) == 0, method
        out = json.loads(capsys.readouterr().out)
        assert out["method"] == method and out["params_after"] < out["params_before"]
        assert out["heal"]["steps"] > 0 and out["comparison"]["examples"] == 2 and out["comparison"]["kl"] > 0
    capsys.readouterr()
    assert main(["search", *common, "--val", "4", "--eval", "2", "--keep-params", "0.6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["eval_loss"] > 0
    assert main(["compare", "--model", model, "--data", "chatterbot", "--calib", "6", "--n", "2", "--max-len", "48",
                 "--eval-max-len", "48", "--student", "mlp:r8", "--student", str(tmp_path / "student"), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["students"]) == 2
