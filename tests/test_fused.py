"""Fused linears (Phi-3's qkv_proj = [q; k; v], gate_up_proj = [gate; up]): planned whole or by parts with
their own ranks, exact accounting both ways, a dense part bit-identical to the teacher's rows, exports that
re-fuse (dense) or rebuild the parts from the config (factorized)."""
from __future__ import annotations

import json

import pytest
import torch

from lowrank_core.linears import count_parameters, linear_map
from lowrank_core.compress import CompressSettings, compress
from lowrank_core.data import make_split
from lowrank_core.decompose import svd_factors
from lowrank_core.export import export_student, load_factorized
from lowrank_core.lowrank import LowRankLinear, ranks_of
from lowrank_core.models import tiny_model
from lowrank_core.plan import PlanError, account, load_plan, resolve_plan
from lowrank_core.sliced import SlicedLinear
from lowrank_core.student import changed_tensors, state_checksums

QKV = "model.layers.{}.self_attn.qkv_proj"
GATE_UP = "model.layers.{}.mlp.gate_up_proj"
PARTS_PLAN = "q_proj:r4; k_proj:r2; 1:up_proj:r6"   # v_proj and gate_proj stay dense


@pytest.fixture(scope="module")
def phi3():
    return tiny_model("phi3", seed=0)


@pytest.fixture(scope="module")
def calib():
    return make_split("chatterbot", n_calib=6, n_eval=0, seed=0).calib


@pytest.fixture
def ids():
    torch.manual_seed(1)
    return torch.randint(0, 256, (2, 16))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_parts_are_row_slices_sized_by_the_config(phi3):
    model, _ = phi3
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    rows = {li.name: (li.rows, li.out_features) for li in linear_map(model, parts=True) if li.layer == 0}
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    assert rows[QKV.format(0) + ".q_proj"] == ((0, q), q)
    assert rows[QKV.format(0) + ".k_proj"] == ((q, q + kv), kv)
    assert rows[QKV.format(0) + ".v_proj"] == ((q + kv, q + 2 * kv), kv)
    i = c.intermediate_size
    assert rows[GATE_UP.format(0) + ".gate_proj"] == ((0, i), i) and rows[GATE_UP.format(0) + ".up_proj"] == ((i, 2 * i), i)
    assert all(info.rows == () for info in linear_map(model))   # the default map: whole linears only
    keys = {li.module: li.gram_key for li in linear_map(model, parts=True) if li.layer == 0}
    assert keys["q_proj"] == keys["k_proj"] == keys["v_proj"] == keys["qkv_proj"] != keys["o_proj"]  # one Gram
    assert keys["gate_proj"] == keys["up_proj"] == keys["gate_up_proj"] != keys["down_proj"]


def test_spectrum_of_a_part_is_that_of_the_teachers_rows(phi3):
    from lowrank_core.spectra import compute_spectrum

    model, _ = phi3
    info = next(li for li in linear_map(model, parts=True) if li.name == QKV.format(1) + ".k_proj")
    rows = model.get_submodule(QKV.format(1)).weight.detach()[64:96]
    spectrum = compute_spectrum(model, info)
    assert spectrum.max_rank == 32 and spectrum.out_features == 32
    assert torch.allclose(torch.as_tensor(spectrum.weight_sv), torch.linalg.svdvals(rows.double()).to(
        torch.as_tensor(spectrum.weight_sv).dtype), rtol=1e-4)


def test_a_group_names_the_fused_matrix_a_module_name_its_part(phi3):
    model, _ = phi3
    linears = linear_map(model, parts=True)
    whole = resolve_plan(load_plan("attn:r8"), linears)
    assert set(whole) == {QKV.format(i) for i in (0, 1)} | {f"model.layers.{i}.self_attn.o_proj" for i in (0, 1)}
    parts = resolve_plan(load_plan("k_proj:r3"), linears)
    assert set(parts) == {QKV.format(i) + ".k_proj" for i in (0, 1)}
    # whole or parts, never both: the later rule wins
    assert set(resolve_plan(load_plan("attn:r8; 0:v_proj:r2"), linears)) >= {QKV.format(0) + ".v_proj", QKV.format(1)}
    assert QKV.format(0) not in resolve_plan(load_plan("attn:r8; 0:v_proj:r2"), linears)
    later = resolve_plan(load_plan("q_proj:r2; qkv_proj:r8"), linears)
    assert set(later) == {QKV.format(i) for i in (0, 1)} and later[QKV.format(0)].rank == 8
    with pytest.raises(PlanError, match=r"rank 40 exceeds min\(out, in\) = 32 for model.layers.0.self_attn.qkv_proj.k_proj"):
        resolve_plan(load_plan("k_proj:r40"), linears)


@pytest.mark.parametrize("plan", ["attn:r8; mlp:k0.5", PARTS_PLAN, "qkv_proj:r6; 0:gate_proj:r3; lm_head:r8"])
def test_accounting_is_exact_whole_or_by_parts(phi3, calib, plan):
    model, tok = phi3
    acc = account(model, plan)
    assert acc.original == model.num_parameters()
    student = compress(model, tok, plan, calib, CompressSettings(method="svd", calib=6, max_len=64)).student
    assert student.num_parameters() == count_parameters(student) == acc.compressed
    assert account(model.config, plan).compressed == acc.compressed   # the same from the config alone


def test_plan_on_the_fused_matrix_factorises_it_whole(phi3, calib, ids):
    model, tok = phi3
    student = compress(model, tok, "0:qkv_proj:r8", calib, CompressSettings(method="svd", calib=6, max_len=64)).student
    module = student.get_submodule(QKV.format(0))
    assert isinstance(module, LowRankLinear) and module.rank == 8 and module.out_features == 128
    ref = svd_factors(model.get_submodule(QKV.format(0)).weight.detach(), 8)
    assert torch.allclose(module.merged_weight(), ref.up @ ref.down, atol=1e-6)


def test_parts_get_their_own_ranks_and_a_dense_part_is_the_teachers_rows(phi3, calib, ids):
    model, tok = phi3
    snapshot = state_checksums(model)
    student = compress(model, tok, PARTS_PLAN, calib, CompressSettings(method="whitened", calib=6, max_len=64)).student
    assert changed_tensors(model, snapshot) == []
    qkv = student.get_submodule(QKV.format(0))
    assert isinstance(qkv, SlicedLinear) and qkv.part_names == ("q_proj", "k_proj", "v_proj")
    assert ranks_of(student) == {QKV.format(i) + p: r for i in (0, 1) for p, r in ((".q_proj", 4), (".k_proj", 2))} | \
        {GATE_UP.format(1) + ".up_proj": 6}
    teacher_w = model.get_submodule(QKV.format(0)).weight
    v = qkv.v_proj
    assert isinstance(v, torch.nn.Linear) and torch.equal(v.weight, teacher_w[96:128])
    assert v.weight.data_ptr() == teacher_w[96:128].data_ptr()   # a view: no copy of the teacher
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = qkv(x)
        assert torch.equal(y[:, 96:], torch.nn.functional.linear(x, teacher_w[96:128]))
        assert torch.allclose(y[:, :64], qkv.q_proj(x)) and torch.allclose(y[:, 64:96], qkv.k_proj(x))
    assert isinstance(student.get_submodule(GATE_UP.format(0)), torch.nn.Linear)  # layer 0 MLP untouched
    assert student.get_submodule(GATE_UP.format(0)).weight is model.get_submodule(GATE_UP.format(0)).weight
    assert not torch.allclose(_logits(student, ids), _logits(model, ids))


def test_dense_export_refuses_exactly(tmp_path, phi3, calib, ids):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model, tok = phi3
    student = compress(model, tok, PARTS_PLAN, calib, CompressSettings(method="svd", calib=6, max_len=64)).student
    result = export_student(student, tok, tmp_path / "dense", "dense")
    assert result.verified and result.parameters == model.num_parameters()
    state = load_file(str(tmp_path / "dense" / "model.safetensors"))
    assert not any(".q_proj" in k or ".down." in k for k in state)
    qkv = student.get_submodule(QKV.format(0))
    fused = state[QKV.format(0) + ".weight"]
    assert torch.equal(fused[:64], (qkv.q_proj.up.weight @ qkv.q_proj.down.weight).detach())
    assert torch.equal(fused[96:], model.get_submodule(QKV.format(0)).weight.detach()[96:])  # the dense part, re-fused
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense"))
    assert torch.allclose(_logits(plain, ids), _logits(student, ids), atol=1e-5)


def test_factorized_export_rebuilds_the_parts(tmp_path, phi3, calib, ids):
    from transformers import AutoModelForCausalLM

    model, tok = phi3
    student = compress(model, tok, PARTS_PLAN, calib, CompressSettings(method="svd", calib=6, max_len=64)).student
    result = export_student(student, tok, tmp_path / "fac", "factorized")
    assert result.verified and result.parameters == account(model, PARTS_PLAN).compressed
    config = json.loads((tmp_path / "fac" / "config.json").read_text())
    assert config["lowrank_slices"][QKV.format(0)] == [["q_proj", 64], ["k_proj", 32], ["v_proj", 32]]
    assert config["lowrank_slices"][GATE_UP.format(1)] == [["gate_proj", 128], ["up_proj", 128]]
    assert GATE_UP.format(0) not in config["lowrank_slices"]
    remote = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fac"), trust_remote_code=True)
    ours = load_factorized(tmp_path / "fac").model
    for loaded in (remote, ours):
        assert count_parameters(loaded) == student.num_parameters()
        assert torch.allclose(_logits(loaded, ids), _logits(student, ids), atol=1e-6)
    assert isinstance(ours.get_submodule(QKV.format(1)), SlicedLinear) and ranks_of(ours) == ranks_of(student)


@pytest.mark.parametrize("method", ["svd", "whitened", "refit", "anchored"])
def test_every_method_compresses_parts(phi3, calib, method):
    from lowrank_core.methods.refit import RefitSettings

    model, tok = phi3
    settings = CompressSettings(method=method, calib=6, max_len=64,
                                method_settings={"refit": RefitSettings(steps=3, batch_tokens=128)})
    plan = "0:qkv_proj:r8; 1:k_proj:r2; 1:v_proj:r3; gate_proj:r6"   # layer 1: the student's stream differs
    result = compress(model, tok, plan, calib, settings)
    assert result.student.num_parameters() == account(model, plan).compressed
    rows = {r["name"]: r for r in result.layers}
    assert rows[QKV.format(1) + ".k_proj"]["rank"] == 2 and rows[QKV.format(1) + ".k_proj"]["shape"] == "32 x 64"
    assert all(r["rel_error"] is None or 0 <= r["rel_error"] < 1 for r in rows.values())


def test_healing_trains_the_parts_factors_and_leaves_dense_parts(phi3, calib):
    from lowrank_core.heal import HealSettings, copy_student, heal

    model, tok = phi3
    student = compress(model, tok, PARTS_PLAN, calib, CompressSettings(method="svd", calib=6, max_len=64)).student
    healed = copy_student(student)
    heal(model, healed, tok, calib, HealSettings(tokens=300, lr=3e-3, batch_tokens=128, max_len=64, eval_every=1,
                                                 patience=50))
    before, after = student.get_submodule(QKV.format(0)), healed.get_submodule(QKV.format(0))
    assert isinstance(after, SlicedLinear)
    assert not torch.equal(before.q_proj.down.weight, after.q_proj.down.weight)
    assert torch.equal(after.v_proj.weight, model.get_submodule(QKV.format(0)).weight[96:])


def test_search_plans_fused_matrices_and_compare_scores_a_parts_plan(tmp_path, capsys):
    from lowrank_core.cli import main

    common = ["--data", "chatterbot", "--calib", "4", "--max-len", "96"]
    out = tmp_path / "plan.yaml"
    assert main(["search", "--model", "tiny-phi3", *common, "--val", "2", "--eval", "4", "--val-max-len", "96",
                 "--budget", "2%", "--out", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    named = {m for rule in record["plan"]["rules"] for m in rule["modules"]}
    assert named and named <= {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}   # the allocator plans them whole
    teacher, _ = tiny_model("phi3")
    assert record["params_after"] == account(teacher, load_plan(str(out))).compressed
    assert main(["compare", "--teacher", "tiny-phi3", "--student", PARTS_PLAN, *common, "--n", "6",
                 "--eval-max-len", "96", "--bootstrap", "50", "--json"]) == 0
    (s,) = json.loads(capsys.readouterr().out)["students"]
    assert s["params"] == account(teacher, PARTS_PLAN).compressed and s["examples"] == 6
