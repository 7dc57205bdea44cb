"""Every arch-table entry through the whole tool on its tiny model (``tiny-<type>``): ``count`` exact,
``spectrum``, ``compress`` with every method and with healing, ``search``, ``compare``, both exports
reloaded (plain transformers, remote code, ``lowrank_core``) to the student's logits, and every app page.
A new ``ArchSpec`` is tested here without a line added."""
from __future__ import annotations

import json
import pytest
import torch

from lowrank_core import methods
from lowrank_core.arch import ARCHS
from lowrank_core.linears import count_parameters, linear_map
from lowrank_core.cli import main
from lowrank_core.export import export_student
from lowrank_core.export.load import load_factorized
from lowrank_core.models import tiny_model
from lowrank_core.plan import account, load_plan

from test_export import make_student, reload_isolated

TYPES = list(ARCHS)
COMMON = ["--data", "chatterbot", "--calib", "6", "--max-len", "48"]


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LOWRANK_WORKSPACE", str(tmp_path / "workspace"))


def cli_json(capsys, argv) -> dict:
    assert main(argv + ["--json"]) == 0, capsys.readouterr().err[-2000:]
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("model_type", TYPES)
def test_count_is_exact(model_type, capsys):
    teacher, _ = tiny_model(model_type)
    out = cli_json(capsys, ["count", "--model", f"tiny-{model_type}", "--plan", "all:k0.5; lm_head:r8"])
    assert out["original"] == teacher.num_parameters() == count_parameters(teacher)
    student = make_student(teacher, "all:k0.5; lm_head:r8")
    assert out["compressed"] == count_parameters(student) < out["original"]


@pytest.mark.parametrize("model_type", TYPES)
def test_spectrum(model_type, capsys):
    out = cli_json(capsys, ["spectrum", "--model", f"tiny-{model_type}", "--layer", "1", "--module", "q_proj",
                            *COMMON[:2], "--calib", "2", "--max-len", "32"])
    model, _ = tiny_model(model_type)
    (q,) = [i for i in linear_map(model, parts=True) if i.layer == 1 and i.module == "q_proj"]  # a slice on phi3
    shape = [q.out_features, q.in_features]
    assert out["name"] == q.name and out["shape"] == shape  # head_dim may differ from hidden / heads
    assert len(out["weight_sv"]) == len(out["aware_sv"]) == min(shape) and out["calibration"]["examples"] == 2


@pytest.mark.parametrize("model_type", TYPES)
def test_compress_with_every_method_and_healing(model_type, capsys):
    """Each registered method (the sequential ones layer by layer) in-process: students smaller by the exact
    count, finite answer losses, the teacher's tensors bit-identical; then a healing job from the CLI."""
    from lowrank_core.compress import CompressSettings, compress
    from lowrank_core.data import make_split
    from lowrank_core.evaluate import evaluate_models
    from lowrank_core.methods.refit import RefitSettings
    from lowrank_core.student import changed_tensors, state_checksums

    teacher, tok = tiny_model(model_type)
    split = make_split("chatterbot", n_calib=6, n_eval=4, seed=0)
    before = state_checksums(teacher)
    expected = account(teacher.config, "all:k0.5").compressed
    for name in methods.names():
        settings = CompressSettings(method=name, calib=6, max_len=48,
                                    method_settings={"refit": RefitSettings(steps=3, batch_tokens=64)})
        student = compress(teacher, tok, "all:k0.5", split.calib, settings).student
        assert count_parameters(student) == expected, name
        loss = evaluate_models({"s": student}, tok, split.eval, max_len=48)["s"].loss
        assert torch.isfinite(torch.tensor(loss)), name
        assert changed_tensors(teacher, before) == [], name
    out = cli_json(capsys, ["compress", "--model", f"tiny-{model_type}", *COMMON, "--eval", "4", "--plan", "all:k0.5",
                            "--heal-tokens", "600", "--heal-batch-tokens", "128", "--heal-max-len", "48",
                            "--heal-patience", "100"])
    assert out["params_after"] == expected
    assert out["heal"]["tokens"] >= 600 and out["heal"]["best_valid"] <= out["heal"]["initial_valid"]


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("probe", ["layer", "gradient"])
def test_search(model_type, probe, tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    record = cli_json(capsys, ["search", "--model", f"tiny-{model_type}", *COMMON, "--eval", "4", "--val", "4",
                               "--val-max-len", "48", "--budget", "5%", "--probe", probe, "--out", str(plan)])
    assert record["val_loss"] - record["teacher_val_loss"] <= record["budget"]
    assert load_plan(str(plan)).to_dict() == record["plan"]
    if probe == "gradient":   # the head path of the gradient scores (Granite: scaled logits)
        assert record["matrices"] and all("first_order" in row for row in record["matrices"])


@pytest.mark.parametrize("model_type", TYPES)
def test_compare(model_type, capsys):
    from lowrank_core.data import make_split
    from lowrank_core.evaluate import evaluate_models

    record = cli_json(capsys, ["compare", "--teacher", f"tiny-{model_type}", "--student", "all:k0.5",
                               "--data", "chatterbot", "--calib", "6", "--n", "6", "--max-len", "48",
                               "--eval-max-len", "48", "--bootstrap", "50"])
    (s,) = record["students"]
    assert s["examples"] == 6 and s["params"] < s["teacher_params"]
    teacher, tok = tiny_model(model_type)
    split = make_split("chatterbot", n_calib=6, n_eval=6, seed=0)
    ref = evaluate_models({"teacher": teacher}, tok, split.eval, max_len=48)["teacher"]
    assert s["teacher_loss"] == pytest.approx(ref.loss, rel=1e-6)   # the head path scores like the model


@pytest.mark.parametrize("model_type", TYPES)
def test_gradient_loss_is_the_models_loss(model_type):
    """The gradient probe's head-on-answers loss equals cross-entropy over the model's own logits."""
    from lowrank_core.allocate.gradient import example_loss

    model, _ = tiny_model(model_type)
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (1, 16))
    labels = ids.clone()
    labels[:, :6] = -100
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
        ref = torch.nn.functional.cross_entropy(logits[0, 5:], ids[0, 6:], reduction="sum")
        assert float(example_loss(model, ids, labels)) == pytest.approx(float(ref), rel=1e-6)


# ----------------------------------------------------------------------------- exports
@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A dense and a factorized export of an SVD student per entry, all reloaded in one isolated process
    (``python -I``, no lowrank_core): plain transformers for dense, remote code for factorized."""
    folder = tmp_path_factory.mktemp("arch_exports")
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 20))
    made, spec = {}, {}
    for model_type in TYPES:
        teacher, tok = tiny_model(model_type)
        student = make_student(teacher, "attn:r4; 1:mlp:r8")
        with torch.no_grad():
            logits = student(input_ids=ids).logits
        for fmt in ("dense", "factorized"):
            result = export_student(student, tok, folder / f"{model_type}-{fmt}", fmt)
            assert result.verified, (model_type, fmt)
            made[(model_type, fmt)] = (result, logits)
            spec[f"{model_type}-{fmt}"] = {"path": result.path, "remote": fmt == "factorized"}
    return made, reload_isolated(folder, spec, ids), ids


@pytest.mark.parametrize("model_type", TYPES)
def test_exports_reload_to_the_students_logits(model_type, exports):
    made, reloaded, ids = exports
    spec = ARCHS[model_type]
    (dense, logits), (fac, _) = made[(model_type, "dense")], made[(model_type, "factorized")]
    plain = reloaded[f"{model_type}-dense"]
    assert plain["class"] == spec.hf_model
    torch.testing.assert_close(torch.tensor(plain["logits"]), logits, atol=1e-4, rtol=1e-4)
    remote = reloaded[f"{model_type}-factorized"]
    assert remote["class"] == "LowRankForCausalLM"
    torch.testing.assert_close(torch.tensor(remote["logits"]), logits, atol=1e-5, rtol=1e-5)
    ours = load_factorized(fac.path).model
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, logits,
                                   atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the app
@pytest.mark.parametrize("model_type", TYPES)
def test_every_page_renders_on_the_tiny_model(model_type, monkeypatch):
    from test_app import APP, _run_entrypoint_every_time, metrics
    from streamlit.testing.v1 import AppTest

    _run_entrypoint_every_time(monkeypatch)
    monkeypatch.setenv("LOWRANK_APP_MODEL", f"tiny-{model_type}")
    monkeypatch.setenv("LOWRANK_APP_DATA", "chatterbot")
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    teacher, _ = tiny_model(model_type)
    assert metrics(at)["linears"] == str(len(linear_map(teacher)))
    spec = ARCHS[model_type]
    assert at.dataframe[0].value["name"].tolist()[0] == spec.linear_name(0, spec.decoder_modules[0])
    at.session_state["spectra_aware"] = False
    for page in ("pages/budget.py", "pages/spectra.py", "pages/compress.py", "pages/search.py",
                 "pages/evaluate.py", "pages/export.py"):
        at.switch_page(page).run()
        assert not at.exception, (page, at.exception)
        assert not at.error, (page, [e.value for e in at.error])


def test_tiny_models_switch_on_what_each_family_adds():
    """The tiny configs exercise each family's difference (else the tests above would only test Llama)."""
    qwen3, olmo2, smollm3, granite = (tiny_model(t)[0] for t in ("qwen3", "olmo2", "smollm3", "granite"))
    assert hasattr(qwen3.model.layers[0].self_attn, "q_norm") and qwen3.config.head_dim == 16
    layer = olmo2.model.layers[0]
    assert hasattr(layer, "post_feedforward_layernorm") and not hasattr(layer, "input_layernorm")
    assert [layer.self_attn.use_rope for layer in smollm3.model.layers] == [1, 0]
    assert smollm3.lm_head.weight is smollm3.model.embed_tokens.weight   # tied, as the published models
    c = granite.config
    assert 1.0 not in (c.embedding_multiplier, c.residual_multiplier, c.logits_scaling)
    assert c.attention_multiplier != (c.hidden_size // c.num_attention_heads) ** -0.5   # not the default scaling

