"""Rank allocation on a tiny model briefly trained on chatterbot (a random model barely reacts to
compression): budget verified on the validation split, break-even respected, valid plans, greedy order."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from lowrank_core.lowrank import LowRankLinear

from lowrank_core.allocate import (BudgetError, MatrixProfile, SearchSettings, allocate, build_profile,
                                   candidate_ranks, error_curve, greedy_path, low_rank_module, parse_budget,
                                   plan_from_ranks)
from lowrank_core.linears import LinearInfo, count_parameters, linear_map
from lowrank_core.compress import CompressSettings, compress
from lowrank_core.data import iter_batches, make_split
from lowrank_core.evaluate import evaluate
from lowrank_core.plan import account, load_plan

MAX_LEN = 96


@pytest.fixture(scope="module")
def split():
    return make_split("chatterbot", n_calib=32, n_eval=16, n_val=12, seed=0)


@pytest.fixture(scope="module")
def trained(split):
    """(model, tokenizer): tiny Llama after 60 Adam steps on calibration examples (val loss ~3 nats)."""
    from lowrank_core.models import tiny_model

    model, tok = tiny_model("llama", seed=0)
    batches = list(iter_batches(tok, split.calib, 8, MAX_LEN))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    model.train()
    for step in range(60):
        b = batches[step % len(batches)]
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    return model, tok


@pytest.fixture(scope="module")
def settings():
    return SearchSettings(val_max_len=MAX_LEN, compression=CompressSettings(calib=32, max_len=MAX_LEN))


@pytest.fixture(scope="module")
def profile(trained, split, settings):
    model, tok = trained
    return build_profile(model, tok, split.calib, split.val, settings)


@pytest.fixture(scope="module")
def binding(trained, split, profile):
    """A budget (nats) that binds: a third of the measured Δloss of compressing every matrix fully."""
    full = _alloc(trained, split, profile, budget=10.0)
    assert full.steps == full.path_length and full.val_loss > full.teacher_loss
    return (full.val_loss - full.teacher_loss) / 3


def _alloc(trained, split, profile, **kw):
    model, tok = trained
    return allocate(model, tok, split.calib, split.val, profile=profile, **kw)


# ----------------------------------------------------------------------------- pure maths
def test_parse_budget():
    assert parse_budget("1%", 2.5) == pytest.approx(0.025)
    assert parse_budget(0.02, 2.5) == 0.02
    assert parse_budget("0.3", 2.5) == pytest.approx(0.3)
    with pytest.raises(BudgetError, match="'lots'"):
        parse_budget("lots", 2.0)
    with pytest.raises(BudgetError, match="-1"):
        parse_budget(-1, 2.0)


def test_error_curve_is_tail_energy():
    s = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    assert error_curve(s) == pytest.approx([1.0, 5 / 14, 1 / 14, 0.0])


def test_candidates_save_parameters():
    info = LinearInfo("model.layers.0.self_attn.k_proj", 0, "attn", "k_proj", 32, 64)  # break-even 21
    ranks = candidate_ranks(info, SearchSettings(ranks=(1, 8, 21, 22, 32, 64)))
    assert ranks == [21, 8, 1]
    assert all(info.factor_params(r) < info.params for r in ranks)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_whitened_basis_matches_decompose(shape):
    """Allocation solves each matrix once with the whitened method's basis (the one solver): its spectrum
    is the whitened singular values and its factors at any rank are bit-identical to compression's."""
    from lowrank_core import methods
    from lowrank_core.decompose import WhitenedBasis, whitened_factors, whitened_singular_values, whitening
    from lowrank_core.lowrank import LowRankLinear

    g = torch.Generator().manual_seed(0)
    W = torch.randn(*shape, generator=g)
    X = torch.randn(200, shape[1], generator=g, dtype=torch.float64)
    wh = whitening(X.T @ X)
    basis = methods.get("whitened").basis(W, wh)
    assert isinstance(basis, WhitenedBasis)
    assert torch.allclose(basis.values, whitened_singular_values(W, wh), rtol=1e-8, atol=1e-8)
    linear = torch.nn.Linear(shape[1], shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(W)
    for r in (1, 7, 20):
        mine, ref = basis.factors(W, r), whitened_factors(W, wh, r)
        assert torch.equal(mine.up, ref.up) and torch.equal(mine.down, ref.down)
        module, expected = low_rank_module(linear, basis, r), LowRankLinear.from_factors(ref, dtype=W.dtype)
        assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), expected.state_dict().values()))


def _profile(name, layer, sens, errors, cands):
    info = LinearInfo(f"model.layers.{layer}.mlp.{name}", layer, "mlp", name, 10, 10)  # 100 params, r costs 20r
    return MatrixProfile(info, cands, errors, sensitivity=sens)


def test_greedy_takes_best_ratio_first_and_skips_a_bad_intermediate_rank():
    flat = [1.0, 0.5, 0.4, 0.3, 0.2, 0.0]            # err(r), r = 0..5
    cheap = _profile("up_proj", 0, 0.01, flat, [4, 2])
    dear = _profile("down_proj", 0, 10.0, flat, [4, 2])
    # rank 4 saves 20 for err 0.05, rank 2 saves 60 for err 0.1: the jump straight to 2 is the better ratio
    kinked = _profile("gate_proj", 1, 0.01, [1.0, 0.5, 0.1, 0.05, 0.05, 0.0], [4, 2])
    steps = greedy_path({p.info.name: p for p in (cheap, dear, kinked)})
    names = [s.name for s in steps]
    assert names.index(cheap.info.name) < names.index(dear.info.name)
    assert all(b.predicted >= a.predicted for a, b in zip(steps, steps[1:]))
    assert steps[-1].removed == 3 * (100 - 40)
    first_kinked = next(s for s in steps if s.name == kinked.info.name)
    assert first_kinked.rank_from is None and first_kinked.rank_to == 2
    # every matrix ends at its lowest candidate
    last = {s.name: s.rank_to for s in steps}
    assert set(last.values()) == {2}


def test_probes_that_lower_the_loss_get_a_median_sensitivity():
    from lowrank_core.allocate.profile import _set_sensitivities

    errors = [1.0, 0.5, 0.25, 0.0]
    ps = [_profile("up_proj", i, 0.0, errors, [2, 1]) for i in range(4)]
    for p, delta in zip(ps, (0.1, 0.2, 0.3, -0.05)):
        p.probe_rank, p.probe_delta = 1, delta          # err(1) = 0.5
    _set_sensitivities(ps)
    assert [p.sensitivity for p in ps[:3]] == pytest.approx([0.2, 0.4, 0.6])
    assert ps[3].imputed and ps[3].sensitivity == pytest.approx(0.4)
    assert not any(p.imputed for p in ps[:3])


def test_plan_from_ranks_groups_layers():
    from lowrank_core.models import tiny_model

    model, _ = tiny_model("llama", seed=0, layers=4)
    infos = linear_map(model)
    ranks = {f"model.layers.{i}.self_attn.v_proj": 5 for i in (0, 1, 3)}
    ranks["model.layers.2.mlp.down_proj"] = 7
    plan = plan_from_ranks(ranks, infos)
    rules = plan.to_dict()["rules"]
    assert {"layers": "0-1,3", "modules": ["v_proj"], "rank": 5, "method": "whitened"} in rules
    assert {"layers": "2", "modules": ["down_proj"], "rank": 7, "method": "whitened"} in rules
    acc = account(model, load_plan(plan.to_dict()))
    assert {r["name"]: r["rank"] for r in acc.rows} == ranks


# ----------------------------------------------------------------------------- on the trained tiny model
def test_budget_respected_on_validation_split(trained, split, profile, settings, binding):
    model, tok = trained
    result = _alloc(trained, split, profile, budget=binding)
    assert result.budget == binding
    assert result.ranks and result.steps < result.path_length
    assert result.val_loss - result.teacher_loss <= result.budget
    # independent measurement with the evaluation module on the same validation examples
    kw = dict(batch_size=settings.val_batch_size, max_len=settings.val_max_len)
    teacher = evaluate(model, tok, split.val, **kw).loss
    student = evaluate(result.student, tok, split.val, **kw).loss
    assert teacher == pytest.approx(result.teacher_loss, abs=1e-5)
    assert student == pytest.approx(result.val_loss, abs=1e-5)
    assert student - teacher <= result.budget + 1e-6


def test_matrix_probe_measures_each_matrix_alone(trained, split, settings, profile, binding):
    from dataclasses import replace

    model, tok = trained
    per_matrix = build_profile(model, tok, split.calib, split.val, replace(settings, probe="matrix"))
    assert per_matrix.teacher_loss == profile.teacher_loss
    assert per_matrix.matrices.keys() == profile.matrices.keys()
    deltas = [p.probe_delta for p in per_matrix.matrices.values()]
    assert any(d > 0 for d in deltas) and all(p.sensitivity > 0 for p in per_matrix.matrices.values())
    assert deltas != [p.probe_delta for p in profile.matrices.values()]
    result = allocate(model, tok, split.calib, split.val, budget=binding, profile=per_matrix)
    assert result.ranks and result.val_loss - result.teacher_loss <= binding


def test_verification_backs_off_when_the_prediction_is_optimistic(trained, split, profile, binding):
    """A profile whose prediction is optimistic by construction: every sensitivity so small that the
    predicted Δloss of the WHOLE path is below the budget, while the budget (``binding``) is a third of
    the measured Δloss of compressing everything. The first prefix verified is then the whole path,
    measured over budget whatever the numbers, and the search must back off to a prefix within budget
    (at worst prefix 0, the teacher)."""
    from dataclasses import replace

    optimistic = copy.copy(profile)
    optimistic.settings = replace(profile.settings, max_verify=8)
    optimistic.matrices = {n: copy.copy(p) for n, p in profile.matrices.items()}
    tiny = binding / (2 * len(optimistic.matrices))   # err <= 1: whole-path prediction <= binding / 2
    for p in optimistic.matrices.values():
        p.sensitivity = tiny
    steps = greedy_path(optimistic.matrices)
    assert steps and steps[-1].predicted < binding, "premise: the whole path is predicted within budget"

    result = _alloc(trained, split, optimistic, budget=binding)
    assert result.path_length == len(steps)
    whole = next(v for v in result.verified if v["steps"] == result.path_length)   # verified first
    assert whole["delta"] == pytest.approx(3 * binding) and not whole["ok"]
    assert any(not v["ok"] for v in result.verified)
    assert result.val_loss - result.teacher_loss <= result.budget
    assert result.steps < max(v["steps"] for v in result.verified)
    assert result.steps < result.path_length and result.predicted_delta < binding
    # the returned plan is the student that was measured: a verified prefix within budget, or the teacher
    assert result.steps == 0 or next(v for v in result.verified if v["steps"] == result.steps)["ok"]


def test_plan_is_valid_and_params_match(trained, split, profile, binding):
    model, _ = trained
    result = _alloc(trained, split, profile, budget=binding)
    acc = account(model, load_plan(json.loads(json.dumps(result.plan.to_dict()))))
    assert acc.compressed == result.params_after == count_parameters(result.student)
    assert not acc.warnings
    assert all(r["rank"] <= r["break_even_rank"] and r["params_after"] < r["params_before"] for r in acc.rows)


def test_unsaving_ranks_are_never_chosen(trained, split):
    model, tok = trained
    s = SearchSettings(ranks=(4, 21, 22, 32, 48, 64), val_max_len=MAX_LEN,
                       compression=CompressSettings(calib=32, max_len=MAX_LEN))
    result = allocate(model, tok, split.calib, split.val, budget=100.0, settings=s)
    by_name = {li.name: li for li in linear_map(model)}
    assert result.ranks
    for name, rank in result.ranks.items():
        li = by_name[name]
        assert li.factor_params(rank) < li.params, f"{name} at rank {rank} does not save parameters"
    assert all(r < 32 for n, r in result.ranks.items() if n.endswith("q_proj"))   # 64x64: break-even 32
    assert all(r <= 21 for n, r in result.ranks.items() if n.endswith("k_proj"))  # 32x64: break-even 21


def test_zero_budget_compresses_nothing_and_more_budget_removes_more(trained, split, profile, binding):
    zero = _alloc(trained, split, profile, budget=0)
    small = _alloc(trained, split, profile, budget=binding)
    huge = _alloc(trained, split, profile, budget=10.0)
    assert zero.ranks == {} and zero.params_after == zero.params_before
    assert huge.removed > small.removed >= zero.removed
    assert huge.steps == huge.path_length


def test_parameter_target_within_one_step(trained, split, profile):
    model, _ = trained
    target = int(0.8 * count_parameters(model))
    result = _alloc(trained, split, profile, budget=None, target_params=target)
    assert result.params_after <= target
    steps = greedy_path(profile.matrices)
    last_step_saving = steps[result.steps - 1].saved
    assert result.params_after + last_step_saving > target
    assert result.val_loss == next(v["val_loss"] for v in result.verified if v["steps"] == result.steps)
    with pytest.raises(BudgetError, match="exactly one"):
        _alloc(trained, split, profile, budget="1%", target_params=target)


def test_every_pareto_point_opens_as_a_plan(trained, split, profile, binding):
    model, _ = trained
    result = _alloc(trained, split, profile, budget=binding)
    assert result.plan_at(result.steps).to_dict() == result.plan.to_dict()
    assert result.ranks_at(result.steps) == result.ranks and result.ranks_at(0) == {}
    for row in result.pareto:
        acc = account(model, result.plan_at(row["steps"]))
        assert acc.compressed == row["params"] and row["kept"] == pytest.approx(row["params"] / result.params_before)
    assert {r["method"] for r in result.plan_at(result.steps, method="refit").to_dict()["rules"]} == {"refit"}
    with pytest.raises(ValueError, match="must be in 0 .. "):
        result.plan_at(result.path_length + 1)
    record = json.loads(json.dumps(result.to_dict()))
    assert "path" not in record and "infos" not in record


def test_search_goal_checks_the_goal_before_any_work(trained):
    from lowrank_core.allocate import decoder_target, search_goal

    model, _ = trained
    assert search_goal(model) == ("1%", None)
    assert search_goal(model, budget="0.02") == ("0.02", None)
    assert search_goal(model, keep_params=0.5) == (None, decoder_target(model, 0.5))
    assert search_goal(model, target_params=50_000) == (None, 50_000)
    with pytest.raises(BudgetError, match="bad loss budget 'lots'"):
        search_goal(model, budget="lots")
    with pytest.raises(BudgetError, match="at most one"):
        search_goal(model, budget="1%", keep_params=0.5)
    with pytest.raises(BudgetError, match="must be in 1 .. "):
        search_goal(model, target_params=10**12)


def test_plan_rebuilds_the_same_student_through_compress(trained, split, profile, settings, binding, tmp_path):
    model, tok = trained
    result = _alloc(trained, split, profile, budget=binding)
    path = tmp_path / "plan.yaml"
    result.plan.save(path)
    rebuilt = compress(model, tok, load_plan(str(path)), split.calib, settings.compression).student
    a, b = dict(result.student.named_modules()), dict(rebuilt.named_modules())
    assert a.keys() == b.keys()
    assert {n: m.rank for n, m in a.items() if isinstance(m, LowRankLinear)} == \
        {n: m.rank for n, m in b.items() if isinstance(m, LowRankLinear)}
    # compress measures whitened down_proj by its output covariance (W G Wᵀ without G; y = W x rounded to
    # float32), the search by the input Gram: factors may turn within nearly equal singular values, the
    # student's loss is the same to float rounding
    searched = evaluate(result.student, tok, split.val, n=8, max_len=128).loss
    assert evaluate(rebuilt, tok, split.val, n=8, max_len=128).loss == pytest.approx(searched, rel=1e-4)


def test_refit_stage_is_verified_and_kept_only_when_better(trained, split, profile, binding):
    from dataclasses import replace

    from lowrank_core.methods.refit import RefitSettings

    model, tok = trained
    cs = replace(profile.settings.compression, method_settings={"refit": RefitSettings(steps=4, lr=1e-3)})
    with_refit = copy.copy(profile)
    with_refit.settings = replace(profile.settings, refit=True, compression=cs)
    result = allocate(model, tok, split.calib, split.val, budget=binding, profile=with_refit)
    assert result.refit is not None and result.refit["val_loss"] > 0
    methods = {r["method"] for r in result.plan.to_dict()["rules"]}
    if result.refit["kept"]:
        assert result.method == "refit" and methods == {"refit"} and result.val_loss == result.refit["val_loss"]
    else:
        assert result.method == "whitened" and methods == {"whitened"} and result.refit["val_loss"] >= result.val_loss
    record = json.loads(json.dumps(result.to_dict()))
    assert record["refit"]["kept"] == result.refit["kept"]


def test_teacher_untouched(trained, split, profile):
    model, _ = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _alloc(trained, split, profile, budget=1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match="'fast'"):
        SearchSettings(probe="fast").validate()
    with pytest.raises(ValueError, match="o_prj"):
        SearchSettings(modules=("o_prj",)).validate()


def test_cli_search_json(tmp_path, capsys):
    from lowrank_core.cli import main

    out = tmp_path / "plan.yaml"
    common = ["--model", "tiny", "--data", "chatterbot", "--calib", "16", "--eval", "12", "--max-len", "96"]
    rc = main(["search", *common, "--val", "8", "--val-max-len", "96", "--budget", "2%", "--out", str(out),
               "--json"])
    assert rc == 0
    record = json.loads(capsys.readouterr().out)
    for key in ("plan", "params_before", "params_after", "teacher_loss", "val_loss", "eval_loss", "pareto"):
        assert key in record
    assert record["val_loss"] - record["teacher_val_loss"] <= record["budget"]
    assert out.is_file() and load_plan(str(out)).to_dict() == record["plan"]
    rc = main(["compress", *common, "--plan", str(out), "--json"])
    assert rc == 0
    rebuilt = json.loads(capsys.readouterr().out)
    assert rebuilt["params_after"] == record["params_after"]
    # compress measures whitened down_proj by its output covariance, the search by the input Gram: float rounding
    assert rebuilt["student_loss"] == pytest.approx(record["eval_loss"], rel=1e-6)


def test_gpu_check_script_runs_on_cpu_at_toy_sizes(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    rc = gpu_check.main(["--tiny", "--device", "cpu", "--layers", "2", "--calib", "4", "--seq-len", "32",
                         "--heal-tokens", "128", "--heal-max-len", "64", "--eval", "4", "--json"])
    assert rc == 0
    record = json.loads(capsys.readouterr().out)
    assert len(record["per_layer_seconds"]) == 2 and min(record["per_layer_seconds"]) > 0
    phases = {row["phase"].split(" (")[0]: row for row in record["phases"]}
    assert {"compress total", "heal", "evaluate", "total"} <= set(phases), sorted(phases)
    total = phases["compress total"]
    # 32 layers instead of the 2 built: more than measured (no timing threshold: both come from one run)
    assert total["extrapolated_7b_seconds"] > total["seconds"] and "32 x" in total["note"]
    assert all(row["peak_gpu_gib"] is None for row in record["phases"])   # no CUDA here: "-" in the table
    assert record["shape"]["hidden_size"] == 256 and record["eval"] is not None and record["heal"] is not None


def test_allocation_with_healing_in_the_loop_respects_the_budget(trained, split, profile, binding):
    """Every verified student is healed first (calibration examples), the budget is checked after
    healing, the returned student is the healed one, and the teacher and the shared factors stay put."""
    from dataclasses import replace

    from lowrank_core.heal import HealSettings
    from lowrank_core.student import changed_tensors, state_checksums

    model, tok = trained
    healing = copy.copy(profile)
    healing.settings = replace(profile.settings, heal=HealSettings(tokens=600, lr=1e-3, batch_tokens=200,
                                                                   max_len=MAX_LEN, patience=50))
    snapshot = state_checksums(model)
    plain = _alloc(trained, split, profile, budget=binding)
    result = _alloc(trained, split, healing, budget=binding)
    assert changed_tensors(model, snapshot) == []
    assert result.heal and all(k in result.heal for k in (v["steps"] for v in result.verified))
    assert all(h["tokens"] > 0 and h["steps"] > 0 for h in result.heal.values())
    assert result.val_loss - result.teacher_loss <= result.budget
    kw = dict(batch_size=profile.settings.val_batch_size, max_len=profile.settings.val_max_len)
    measured = evaluate(result.student, tok, split.val, **kw).loss - evaluate(model, tok, split.val, **kw).loss
    assert measured == pytest.approx(result.val_loss - result.teacher_loss, abs=1e-5) and measured <= binding + 1e-6
    assert plain.heal is None and result.student is not plain.student
    assert json.loads(json.dumps(result.to_dict()))["heal"]
