"""Model sources: tiny models, error messages, the embedded default (integration)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lowrank_core.models import ModelSourceError, load_config, load_model, model_fingerprint, tiny_model


def test_tiny_sources_load_and_fingerprint_is_stable():
    a = load_model("tiny-mistral", device="cpu")
    b = load_model("tiny-mistral", device="cpu")
    assert a.fingerprint == b.fingerprint
    assert a.model.config.model_type == "mistral" and a.device == "cpu"
    with torch.no_grad():
        b.model.model.layers[0].mlp.down_proj.weight.mul_(2)
    assert model_fingerprint(b.model) != a.fingerprint


def test_tiny_tokenizer_chat_template():
    _, tok = tiny_model()
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok("héllo")["input_ids"]) == "héllo"


def test_dtype_and_device_errors():
    with pytest.raises(ModelSourceError, match="unknown dtype 'float8'.*float32, bfloat16, float16"):
        load_model("tiny", dtype="float8")
    with pytest.raises(ModelSourceError, match="unknown device 'tpu'"):
        load_model("tiny", device="tpu")
    assert load_model("tiny", dtype="bfloat16", device="cpu").model.dtype == torch.bfloat16


def test_missing_source_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(ModelSourceError, match="not found"):
        load_config(str(tmp_path / "nope"))
    with pytest.raises(ModelSourceError, match="no config.json"):
        load_config(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="local folder|pass that folder"):
        load_config("Open-Orca/Mistral-7B-OpenOrca-not-cached")


@pytest.mark.integration
def test_embedded_default(embedded):
    model, tok = embedded.model, embedded.tokenizer
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == ("llama", 30, 9, 3)
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    from lowrank_core.models import embedded_model_dir

    folder = embedded_model_dir()
    assert (folder / "model.safetensors").is_file()
    assert not (folder / "pytorch_model.bin").exists()
    # the converted weights give a sensible next token: greedy answer to a simple question is not garbage
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_factorized_export_is_a_model_source(tmp_path, tiny):
    """``load_model(<factorized export>)`` builds the LowRankLinear model itself: same logits, fewer params."""
    from test_export import make_student

    from lowrank_core.linears import count_parameters
    from lowrank_core.export import export_student
    from lowrank_core.lowrank import LowRankLinear

    teacher, tok = tiny
    student = make_student(teacher, "mlp:r4")
    out = export_student(student, tok, tmp_path / "exp", format="factorized", verify=False)
    loaded = load_model(str(out.path), device="cpu")
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, student(ids).logits, atol=1e-5)
    assert count_parameters(loaded.model) == count_parameters(student) < count_parameters(teacher)
    assert isinstance(loaded.model.model.layers[0].mlp.down_proj, LowRankLinear)


def test_models_does_not_import_export():
    """The dependency goes one way: export.load uses models, models never imports export."""
    code = ("import sys, lowrank_core.models; "
            "assert not [m for m in sys.modules if m.startswith('lowrank_core.export')], sorted(sys.modules); "
            "import lowrank_core.export")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
