"""Plans, architecture map and exact parameter accounting (seed numbers are acceptance tests)."""
from __future__ import annotations

import json

import pytest

from lowrank_core.linears import UnsupportedArchitectureError, count_parameters, linear_map, meta_model
from lowrank_core.cli import main
from lowrank_core.plan import Plan, PlanError, account, load_plan, resolve_plan

from conftest import MISTRAL_CONFIG

SEED_SCENARIOS = {
    # every linear (q,k,v,o,gate,up,down of all 32 layers, and lm_head) at rank 16
    "all:r16; lm_head:r16": 173_867_040,
    # attention of layers 6..31 at rank 16
    "6-31:attn:r16": 6_162_305_024,
    # that plus the whole MLP of 7 layers (0-6 inclusive) at rank 16
    "6-31:attn:r16; 0-6:mlp:r16": 4_935_372_800,
    # experiment 3: MLP of layer 17
    "17:mlp:r16": 7_066_472_448,
}


def test_mistral_original_count(mistral_config):
    assert count_parameters(meta_model(mistral_config)) == 7_241_748_480


@pytest.mark.parametrize("plan,expected", SEED_SCENARIOS.items())
def test_seed_numbers(mistral_config, plan, expected):
    acc = account(mistral_config, plan)
    assert acc.original == 7_241_748_480
    assert acc.compressed == expected


def test_seed_numbers_from_yaml_file(mistral_config, tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(
        "rules:\n"
        "  - {layers: \"6-31\", modules: [attn], rank: 16}\n"
        "  - {layers: \"0-6\", modules: [mlp], rank: 16}\n")
    assert account(mistral_config, str(path)).compressed == 4_935_372_800
    jpath = tmp_path / "plan.json"
    jpath.write_text(json.dumps({"rules": [{"layers": "17", "modules": ["mlp"], "rank": 16}]}))
    assert account(mistral_config, str(jpath)).compressed == 7_066_472_448


def test_arch_map_rows(mistral_config):
    rows = linear_map(mistral_config)
    assert len(rows) == 32 * 7 + 1
    k = next(r for r in rows if r.name == "model.layers.0.self_attn.k_proj")
    assert (k.group, k.out_features, k.in_features) == ("attn", 1024, 4096)   # GQA: 8 KV heads
    assert k.break_even_rank == 4096 * 1024 // (4096 + 1024)
    head = rows[-1]
    assert (head.name, head.group, head.layer, head.tied) == ("lm_head", "head", None, False)
    assert rows[0].gram_key == rows[1].gram_key == rows[2].gram_key != rows[3].gram_key


def test_later_rules_override_and_keep(mistral_config):
    linears = linear_map(mistral_config)
    plan = load_plan("all:attn:r16; 3:q_proj:k0.5; 3:k_proj:dense")
    res = resolve_plan(plan, linears)
    q3 = res["model.layers.3.self_attn.q_proj"]
    assert q3.rank == int(0.5 * 4096 * 4096 / 8192) and q3.rule_index == 1
    assert "model.layers.3.self_attn.k_proj" not in res
    assert res["model.layers.4.self_attn.k_proj"].rank == 16
    assert "lm_head" not in res  # lm_head only when named


def test_inclusive_ranges_and_lists(mistral_config):
    res = resolve_plan(load_plan("0-6,9:down_proj:r8"), linear_map(mistral_config))
    assert sorted(a.info.layer for a in res.values()) == [0, 1, 2, 3, 4, 5, 6, 9]


def test_above_break_even_is_flagged(mistral_config):
    acc = account(mistral_config, "0:k_proj:r1000")  # break-even of 1024x4096 is 819
    assert acc.compressed > acc.original
    assert acc.rows[0]["above_break_even"] and "break-even" in acc.warnings[0]


@pytest.mark.parametrize("plan,fragment", [
    ("0:k_proj:r1025", "exceeds min(out, in) = 1024"),
    ("0:q_proj:r0", "below 1"),
    ("32:mlp:r16", "unknown layer 32"),
    ("0:qq_proj:r16", "unknown module 'qq_proj'"),
    ("0:q_proj:k1.5", "outside (0, 1]"),
    ("0:q_proj:kx", "bad rank/keep"),
    ("0:q_proj:r16:magic", "unknown method 'magic'"),
    ("0:q_proj:k0.0001", "ranks must be at least 1"),
    ("5-2:q_proj:r4", "end before start"),
])
def test_plan_errors_name_the_rule(mistral_config, plan, fragment):
    with pytest.raises(PlanError) as e:
        account(mistral_config, "all:attn:r16; " + plan)
    assert "rule 2" in str(e.value) and fragment in str(e.value)


def test_plan_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - {layers: all, modules: [attn], rank: 16, keep: 0.5}\n")
    with pytest.raises(PlanError, match="exactly one of rank, keep"):
        load_plan(str(bad))
    bad.write_text("rules:\n  - {layers: all, modules: [attn], rnak: 16}\n")
    with pytest.raises(PlanError, match="unknown key.*rnak"):
        load_plan(str(bad))
    with pytest.raises(PlanError, match="not found"):
        load_plan(str(tmp_path / "missing.yaml"))


def test_plan_roundtrip(tmp_path, mistral_config):
    plan = load_plan("6-31:attn:r16; 0-6:mlp:k0.5:whitened; lm_head:r16")
    for suffix in (".yaml", ".json"):
        path = tmp_path / f"p{suffix}"
        plan.save(path)
        again = load_plan(str(path))
        assert again == plan
        assert account(mistral_config, again).compressed == account(mistral_config, plan).compressed
    assert isinstance(plan, Plan) and plan.rules[1].method == "whitened"


def test_plan_text_in_yaml_or_json_loads_like_its_file():
    """The app's text areas hold ``Plan.to_yaml()`` text (a plan stored by the Budget or Search page)."""
    plan = load_plan("6-31:attn:r16; 0-6:mlp:k0.5:whitened; lm_head:r16")
    assert load_plan(plan.to_yaml()) == plan
    assert load_plan(json.dumps(plan.to_dict())) == plan
    with pytest.raises(PlanError, match="plan text is not valid YAML"):
        load_plan("rules: [")
    with pytest.raises(PlanError, match="unknown key.*rnak"):
        load_plan("rules:\n  - {layers: all, modules: [attn], rnak: 16}\n")


def test_tied_head_frees_nothing(tiny):
    model, _ = tiny
    acc = account(model, "lm_head:r4")
    info = linear_map(model)[-1]
    assert info.tied
    assert acc.compressed == acc.original + 4 * (info.in_features + info.out_features)
    assert any("tied" in w for w in acc.warnings)


def test_a_head_rule_needs_a_head_linear_named_by_the_table(mistral_config):
    """``lm_head`` (the table's ``ArchSpec.head``) resolves to the model's head linear, tied or not; a model
    without one refuses the rule in the plan and in ``spectrum``, naming the head."""
    from lowrank_core.arch import all_head_modules
    from lowrank_core.cli import CliError
    from lowrank_core.commands.spectrum import _find_linear

    assert all_head_modules() == ("lm_head",)
    linears = linear_map(mistral_config)
    assert list(resolve_plan(load_plan("lm_head:r16"), linears)) == ["lm_head"]
    assert _find_linear(linears, None, "lm_head").name == "lm_head"
    headless = [li for li in linears if li.group != "head"]
    with pytest.raises(PlanError, match="rule 1.*unknown module 'lm_head': this model has no separate lm_head linear"):
        resolve_plan(load_plan("lm_head:r16"), headless)
    with pytest.raises(CliError, match="no separate lm_head linear"):
        _find_linear(headless, None, "lm_head")
    assert list(resolve_plan(load_plan("0:q_proj:r4"), headless)) == ["model.layers.0.self_attn.q_proj"]


def test_unsupported_architecture():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        linear_map(GPT2Config(n_layer=1, n_embd=32, n_head=2))


def test_count_cli_json(capsys):
    assert main(["count", "--model", str(MISTRAL_CONFIG), "--plan", "6-31:attn:r16; 0-6:mlp:r16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["original"] == 7_241_748_480 and out["compressed"] == 4_935_372_800


def test_count_cli_table_and_error(capsys):
    assert main(["count", "--model", str(MISTRAL_CONFIG), "--plan", "17:mlp:r16"]) == 0
    assert "7,066,472,448" in capsys.readouterr().out
    assert main(["count", "--model", str(MISTRAL_CONFIG), "--plan", "40:mlp:r16"]) == 2
    assert "unknown layer 40" in capsys.readouterr().err
