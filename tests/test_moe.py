"""Mixture of experts (Mixtral, Qwen3-MoE): per-expert linears as plan matrices, Grams of the rows routed to
each expert, the router dense, exact accounting, experts warned about when the router starves them, exports."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lowrank_core.linears import count_parameters, linear_map, meta_model
from lowrank_core.calibrate import collect_grams
from lowrank_core.compress import CompressSettings, compress
from lowrank_core.data import make_split
from lowrank_core.data.encoding import calibration_batches
from lowrank_core.export import export_student
from lowrank_core.modeling_lowrank import ExpertList
from lowrank_core.models import ModelSourceError, load_model, tiny_config, tiny_model
from lowrank_core.plan import account, load_plan, resolve_plan
from lowrank_core.student import state_checksums

MOE = ["mixtral", "qwen3_moe"]


@pytest.fixture(scope="module")
def split():
    return make_split("chatterbot", n_calib=8, n_eval=4, seed=0)


def stacked_teacher(arch, tok):
    """The same random model as ``tiny_model(arch)``, as transformers builds it (stacked experts)."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=len(tok)), dtype=torch.float32).eval()


def padded_batch(tok, split):
    return calibration_batches(tok, split.calib[:4], batch_size=4, max_len=48)[-1]


@pytest.mark.parametrize("arch", MOE)
def test_per_expert_linears_reproduce_the_stacked_experts(arch, split):
    model, tok = tiny_model(arch)
    stacked = stacked_teacher(arch, tok)
    assert any(isinstance(m, ExpertList) for m in model.modules())
    assert not any(isinstance(m, ExpertList) for m in stacked.modules())
    batch = padded_batch(tok, split)
    assert not bool(batch["attention_mask"].all())  # padding present
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = stacked(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert model.num_parameters() == stacked.num_parameters() == count_parameters(meta_model(model.config))


@pytest.mark.parametrize("arch", MOE)
def test_linear_map_names_each_expert_and_never_the_router(arch):
    model, _ = tiny_model(arch)
    linears = linear_map(model)
    n_experts = model.config.num_local_experts if arch == "mixtral" else model.config.num_experts
    experts = [li for li in linears if li.group == "experts"]
    moe_layers = {li.layer for li in experts}
    assert len(experts) == len(moe_layers) * n_experts * 3
    last = max(moe_layers)
    assert f"model.layers.{last}.mlp.experts.{n_experts - 1}.down_proj" in {li.name for li in experts}
    assert all(li.expert == int(li.name.split(".")[-2]) for li in experts)
    assert not any(".mlp.gate" in li.name and "gate_proj" not in li.name for li in linears)  # router stays dense
    # exact accounting: each expert's gate/up [I, H] and down [H, I] cost r*(in+out) at rank r
    acc = account(model.config, "experts:r4")
    saved = sum(li.params - 4 * (li.in_features + li.out_features) for li in experts)
    assert acc.original == model.num_parameters() and acc.compressed == acc.original - saved


def test_experts_group_is_the_experts_and_mlp_is_every_feed_forward_linear():
    model, _ = tiny_model("qwen3_moe")   # layer 0 is a dense MLP (mlp_only_layers), layer 1 a MoE layer
    linears = linear_map(model)
    experts = resolve_plan(load_plan("experts:r4"), linears)
    mlp = resolve_plan(load_plan("mlp:r4"), linears)
    assert experts and all(".experts." in n for n in experts)
    assert set(mlp) == set(experts) | {f"model.layers.0.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")}
    assert set(resolve_plan(load_plan("down_proj:r4"), linears)) == {n for n in mlp if n.endswith("down_proj")}


@pytest.mark.parametrize("arch", MOE)
def test_expert_grams_hold_exactly_the_real_tokens_routed_to_each_expert(arch, split):
    model, tok = tiny_model(arch)
    batch = padded_batch(tok, split)
    mask = batch["attention_mask"].bool()
    gates = [li for li in linear_map(model) if li.group == "experts" and li.module == "gate_proj"]
    layer = max(li.layer for li in gates)
    linears = [li for li in gates if li.layer == layer]
    router = model.get_submodule(f"model.layers.{layer}.mlp.gate")
    seen = []
    handle = router.register_forward_hook(lambda m, args, out: seen.append(out[2]))
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        handle.remove()
    chosen = seen[0][mask.reshape(-1)]               # [real tokens, top-k]
    padded = collect_grams(model, [batch], linears, unpad=False)
    alone = collect_grams(model, [batch], linears, unpad=True)   # each example forwarded without its padding
    for li in linears:
        expected = int((chosen == li.expert).sum())
        assert padded[li.gram_key].tokens == expected == alone[li.gram_key].tokens, li.name
        assert torch.allclose(padded[li.gram_key].gram, alone[li.gram_key].gram, atol=1e-4, rtol=1e-5)
    assert sum(padded[li.gram_key].tokens for li in linears) == int(mask.sum()) * model.config.num_experts_per_tok


@pytest.mark.parametrize("arch", MOE)
def test_router_and_teacher_untouched_and_full_rank_student_equals_teacher(arch, split):
    teacher, tok = tiny_model(arch)
    before = state_checksums(teacher)
    ranks = {li.name: li.max_rank for li in linear_map(teacher) if li.group == "experts"}
    plan = {"rules": [{"modules": ["experts"], "rank": max(ranks.values())}]}
    result = compress(teacher, tok, plan, split.calib, CompressSettings(calib=8, max_len=48, method="svd"))
    assert state_checksums(teacher) == before
    layer = max(li.layer for li in linear_map(teacher) if li.group == "experts")
    name = f"model.layers.{layer}.mlp.gate.weight"
    assert dict(result.student.named_parameters())[name] is dict(teacher.named_parameters())[name]
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(result.student(ids).logits, teacher(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", MOE)
def test_an_expert_routed_too_few_tokens_is_warned_about(arch, split):
    teacher, tok = tiny_model(arch)
    heard = []
    result = compress(teacher, tok, "experts:r4", split.calib[:2], CompressSettings(calib=2, max_len=16),
                      warn=heard.append)
    message = next(m for m in result.warnings if "expert(s) were routed fewer fit tokens" in m)
    assert ".mlp.experts." in message and message in heard
    low = [r for r in result.layers if r["fit_tokens"] is not None and r["fit_tokens"] < 64 and "gate_proj" in r["name"]]
    assert low and low[0]["name"].rsplit(".", 1)[0] in message


@pytest.mark.parametrize("arch", MOE)
def test_dense_export_is_plain_transformers_with_stacked_experts(arch, split, tmp_path):
    teacher, tok = tiny_model(arch)
    student = compress(teacher, tok, "experts:r4; attn:r8", split.calib, CompressSettings(calib=8, max_len=48)).student
    out = export_student(student, tok, tmp_path / arch, "dense")
    assert out.verified and out.max_logit_diff < 1e-5
    from safetensors import safe_open
    keys = set()
    for path in (tmp_path / arch).glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            keys.update(f.keys())
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in keys)
    assert not any(".experts.0." in k for k in keys)
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / arch), dtype=torch.float32).eval()
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, student(ids).logits, atol=1e-5, rtol=0)
    loaded = load_model(str(tmp_path / arch), device="cpu")   # our loader: per-expert linears again
    assert any(isinstance(m, ExpertList) for m in loaded.model.modules())
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, student(ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(ModelSourceError, match=rf"device_map is not supported yet for mixture-of-experts .*{arch}"):
        load_model(str(tmp_path / arch), device_map="auto")


@pytest.mark.parametrize("arch", MOE)
def test_factorized_export_rebuilds_the_experts_through_its_own_modeling_file(arch, split, tmp_path):
    teacher, tok = tiny_model(arch)
    student = compress(teacher, tok, "experts:r4", split.calib, CompressSettings(calib=8, max_len=48, method="svd")).student
    out = export_student(student, tok, tmp_path / arch, "factorized")
    assert out.verified and out.max_logit_diff < 1e-5
    remote = AutoModelForCausalLM.from_pretrained(str(tmp_path / arch), trust_remote_code=True).eval()  # our class
    assert type(remote).__name__ == "LowRankForCausalLM"
    assert sum(p.numel() for p in remote.parameters()) == count_parameters(student)
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(remote(ids).logits, student(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", MOE)
@pytest.mark.parametrize("method", ["refit", "anchored"])
def test_sequential_methods_refine_expert_factors_then_healing_trains_them(arch, method, split):
    from lowrank_core.heal import HealSettings, heal
    from lowrank_core.methods.refit import RefitSettings

    teacher, tok = tiny_model(arch)
    settings = CompressSettings(calib=8, max_len=48, method=method, hidden_mse=False,
                                method_settings={"refit": RefitSettings(steps=2, batch_tokens=64)})
    result = compress(teacher, tok, "experts:r4; attn:r8", split.calib, settings)
    assert result.split["path"] == "layerwise"
    experts = [r for r in result.layers if ".experts." in r["name"]]
    assert experts and all(r["fit_tokens"] for r in experts)
    factors = sum(p.numel() for n, p in result.student.named_parameters() if n.endswith((".down.weight", ".up.weight")))
    healed = heal(teacher, result.student, tok, split.calib,
                  HealSettings(tokens=256, batch_tokens=64, max_len=48, eval_every=2, patience=1))
    assert healed.steps > 0 and healed.trained_parameters == factors   # every expert's factors, nothing else
    assert healed.best_valid <= healed.initial_valid


def test_plans_name_one_expert_and_allocation_plans_reproduce_per_expert_ranks():
    from lowrank_core.allocate.path import plan_from_ranks
    from lowrank_core.plan import PlanError

    model, _ = tiny_model("mixtral")
    linears = linear_map(model)
    got = resolve_plan(load_plan("1:experts.2:r4; experts.3.down_proj:r6"), linears)
    assert {n: a.rank for n, a in got.items()} == {
        **{f"model.layers.1.mlp.experts.2.{m}": 4 for m in ("gate_proj", "up_proj", "down_proj")},
        **{f"model.layers.{i}.mlp.experts.3.down_proj": 6 for i in (0, 1)}}
    with pytest.raises(PlanError, match=r"unknown module 'experts\.2\.w1'.*experts\.<e>"):
        load_plan("experts.2.w1:r4")
    ranks = {li.name: 2 + (li.expert or 0) + li.layer for li in linears if li.group == "experts"}
    plan = plan_from_ranks(ranks, linears)
    assert {n: a.rank for n, a in resolve_plan(plan, linears).items()} == ranks


def test_spectrum_of_one_experts_linear_and_a_missing_expert_is_one_clear_line(capsys, tmp_path, monkeypatch):
    import json

    from lowrank_core.cli import main

    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path))
    assert main(["spectrum", "--model", "tiny-mixtral", "--layer", "1", "--module", "down_proj"]) == 2
    assert "--expert is required for down_proj of layer 1 (a mixture-of-experts layer); allowed: 0..3" in \
        capsys.readouterr().err
    assert main(["spectrum", "--model", "tiny-mixtral", "--layer", "1", "--module", "down_proj", "--expert", "7"]) == 2
    assert "--expert 7 is not an expert of layer 1; allowed: 0..3" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["spectrum", "--model", "tiny-mixtral", "--layer", "1", "--module", "down_proj", "--expert", "2",
                 "--data", "chatterbot", "--calib", "2", "--max-len", "32", "--json"]) in (0, None)
    out = json.loads(capsys.readouterr().out)
    assert out["name"] == "model.layers.1.mlp.experts.2.down_proj" and len(out["aware_sv"]) == 32
