"""compress(): both paths, every method, exact accounting, teacher untouched, per-matrix/per-layer rows, CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch

from lowrank_core.arch import ARCHS
from lowrank_core.compress import CompressSettings, compress
from lowrank_core.methods.refit import RefitSettings
from lowrank_core.data import calibration_batches, split_examples
from lowrank_core.data import make_split
from lowrank_core.models import tiny_model
from lowrank_core.plan import account
from lowrank_core.student import changed_tensors, state_checksums


@pytest.fixture(scope="module")
def calib():
    return make_split("chatterbot", n_calib=12, n_eval=0).calib


def _settings(method="whitened", **kw):
    refit = kw.pop("refit", RefitSettings(steps=4, lr=1e-3))
    return CompressSettings(method=method, calib=12, max_len=64, batch_size=4, method_settings={"refit": refit}, **kw)


def _logits(model, tok):
    ids = torch.tensor([tok.encode("hello there, how are you?")])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method,layerwise", [("svd", False), ("whitened", False), ("whitened", True),
                                              ("refit", True)])
def test_compress_counts_rows_and_leaves_teacher(calib, method, layerwise):
    model, tok = tiny_model("llama", layers=2)
    snap, ref = state_checksums(model), _logits(model, tok)
    plan = "all:k0.5"
    r = compress(model, tok, plan, calib, _settings(method, layerwise=layerwise))
    assert r.params_after == account(model, plan).compressed < r.params_before
    assert changed_tensors(model, snap) == []
    assert torch.equal(_logits(model, tok), ref)
    assert {row["name"] for row in r.layers} == set(r.assignments) and len(r.assignments) == 14
    assert all(row["method"] == method and 0 <= row["rel_error"] < 1 for row in r.layers)
    assert all(row["rel_error_fit"] is None for row in r.layers)  # only on request when a held-out set exists
    assert [row["layer"] for row in r.hidden_mse] == [0, 1]
    assert all(math.isfinite(row["mse"]) and row["mse"] > 0 for row in r.hidden_mse)
    assert r.split["fit_examples"] + r.split["held_out_examples"] == 12 and r.split["held_out_tokens"] > 0
    assert set(r.timings) >= {"calibration", "decomposition", "refit", "total"}
    assert (r.split["path"] == "layerwise") == layerwise
    assert bool(r.refit_curves) == (method == "refit")
    out = _logits(r.student, tok)
    assert out.shape == ref.shape and not torch.equal(out, ref)


def test_whitened_beats_svd_per_matrix(calib):
    model, tok = tiny_model("mistral", layers=2)
    rows = {m: {row["name"]: row for row in compress(model, tok, "all:k0.4", calib, _settings(m, fit_errors=True)).layers}
            for m in ("svd", "whitened")}
    for name, row in rows["whitened"].items():
        assert row["rel_error_fit"] <= rows["svd"][name]["rel_error_fit"] + 1e-9, name


@pytest.mark.parametrize("arch", list(ARCHS))
def test_layerwise_matches_fast_path_on_first_compressed_layer(calib, arch):
    """Before any layer is compressed both paths see the teacher's inputs: identical factors and errors."""
    model, tok = tiny_model(arch, layers=2)
    fast = compress(model, tok, "all:r8", calib, _settings("whitened"))
    seq = compress(model, tok, "all:r8", calib, _settings("whitened", layerwise=True))
    for a, b in zip(fast.layers, seq.layers):
        assert a["name"] == b["name"]
        if a["layer"] == 0:
            assert a["rel_error"] == pytest.approx(b["rel_error"], rel=1e-4)
    assert seq.hidden_mse[0]["mse"] == pytest.approx(fast.hidden_mse[0]["mse"], rel=1e-4)


def test_untouched_layers_have_zero_hidden_error_and_mixed_methods(calib):
    model, tok = tiny_model("llama", layers=3)
    plan = "1:attn:r8:svd; 2:mlp:r8:refit"
    r = compress(model, tok, plan, calib, _settings("whitened"))
    assert r.hidden_mse[0]["mse"] == 0.0 and r.hidden_mse[1]["mse"] > 0
    methods = {row["module"]: row["method"] for row in r.layers}
    assert methods["q_proj"] == "svd" and methods["down_proj"] == "refit"
    assert list(r.refit_curves) == ["layer 2"]
    assert r.params_after == account(model, plan).compressed


@pytest.mark.parametrize("layerwise", [False, True])
def test_lm_head_is_compressed_from_final_norm_inputs(calib, layerwise):
    model, tok = tiny_model("mistral", layers=2)  # untied head
    r = compress(model, tok, "lm_head:r16", calib, _settings("whitened", layerwise=layerwise))
    (row,) = r.layers
    assert row["name"] == "lm_head" and 0 < row["rel_error"] < 1
    assert r.params_after == account(model, "lm_head:r16").compressed


def test_bad_settings_are_rejected(calib):
    model, tok = tiny_model("llama", layers=2)
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        compress(model, tok, "all:r8", calib, _settings("magic"))
    with pytest.raises(ValueError, match="calibration example"):
        compress(model, tok, "all:r8", [], _settings())
    with pytest.raises(ValueError, match="batch_size"):
        compress(model, tok, "all:r8", calib, CompressSettings(batch_size=0))


def test_split_and_batches(calib):
    fit, held = split_examples(calib, 0.25, seed=0)
    assert len(held) == 3 and len(fit) == 9 and not set(fit) & set(held)
    assert split_examples(calib, 0.25, seed=0) == (fit, held)
    assert split_examples(calib, 0.0) == (list(calib), [])
    _, tok = tiny_model("llama", layers=1)
    batches = calibration_batches(tok, calib, batch_size=5, max_len=48)
    lengths = [int(n) for b in batches for n in b["attention_mask"].sum(1)]
    assert lengths == sorted(lengths) and max(lengths) <= 48 and len(lengths) <= 12


def test_cli_compress_json(capsys):
    from lowrank_core.cli import main

    rc = main(["compress", "--model", "tiny", "--data", "chatterbot", "--plan", "all:k0.5", "--method",
               "whitened", "--calib", "8", "--eval", "4", "--max-len", "64", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("params_before", "params_after", "teacher_loss", "student_loss", "compress", "split", "job"):
        assert key in out, key
    for key in ("layers", "hidden_mse", "timings", "split"):  # the CompressResult record
        assert key in out["compress"], key
    assert out["split"]["fingerprint"] and out["job"]["data"]["calib"] == 8
    assert out["params_after"] < out["params_before"] and len(out["compress"]["layers"]) == 14
    assert out["student_loss"] != out["teacher_loss"] and out["evaluation"]["student"]["examples"] == 4


def test_cli_compress_table_and_bad_plan(capsys):
    from lowrank_core.cli import main

    rc = main(["compress", "--model", "tiny", "--data", "chatterbot", "--plan", "0:mlp:r8", "--calib", "6",
               "--eval", "0", "--max-len", "64", "--layerwise"])
    text = capsys.readouterr().out
    assert rc == 0 and "model.layers.0.mlp.down_proj" in text and "params after" in text
    assert main(["compress", "--model", "tiny", "--data", "chatterbot", "--plan", "0:mlp:r999", "--eval", "0"]) == 2
    assert "exceeds" in capsys.readouterr().err


def test_offloaded_layerwise_matches_plain_layerwise(calib):
    """The 7B settings (explicit compute device, hidden states kept on CPU) change nothing numerically."""
    model, tok = tiny_model("llama", layers=2)
    plain = compress(model, tok, "all:r8", calib, _settings("whitened", layerwise=True))
    offl = compress(model, tok, "all:r8", calib, _settings("whitened", layerwise=True, device="cpu", offload=True))
    assert [r["rel_error"] for r in plain.layers] == [r["rel_error"] for r in offl.layers]
    assert [r["mse"] for r in plain.hidden_mse] == [r["mse"] for r in offl.hidden_mse]
