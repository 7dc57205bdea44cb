"""Inference speed: rank rounding (``plan.round_rank``, ``Plan.rank_multiple``, ``--rank-multiple``), the
speed break-even search (fields only: no timing thresholds), and the Budget page's rounding selectbox and
"Measure speed" button (AppTest on the tiny model)."""
from __future__ import annotations

import json

import pytest
import yaml

from lowrank_core.linears import linear_map, meta_model
from lowrank_core.cli import build_parser, main
from lowrank_core.compare_job import CompareSpec
from lowrank_core.commands.compress import job_from_args
from lowrank_core.models import tiny_config
from lowrank_core.plan import (RANK_MULTIPLES, Plan, PlanError, PlanOptions, account, check_rank_multiple, load_plan,
                               parse_plan_string, plan_from_rows, resolve_plan, round_rank, rows_from_plan,
                               with_rank_multiple)
from lowrank_core.speed import (SpeedBreakeven, measure_shapes, shape_groups, speed_breakeven, speed_rows,
                                time_linear)
from test_app import metrics, started, texts, tiny_env  # noqa: F401  (tiny_env: autouse)


@pytest.fixture(scope="module")
def tiny_linears():
    """Tiny Llama linears: q/o 64x64, k/v 32x64, gate/up 128x64, down 64x128 (2 layers), lm_head 259x64 (tied)."""
    return linear_map(meta_model(tiny_config("llama")))


# ----------------------------------------------------------------------------- round_rank
@pytest.mark.parametrize("rank,multiple,limit,expected", [
    (100, 64, 576, 64),    # down to a multiple
    (130, 64, 576, 128),
    (20, 8, 576, 16),
    (63, 64, 576, 64),     # below the multiple: up to the multiple
    (1, 128, 576, 128),
    (600, 64, 576, 576),   # clamped to the limit first (576 = 9 x 64)
    (600, 128, 576, 512),
    (50, 128, 64, 50),     # a matrix narrower than the multiple keeps its rank
    (10, 64, 64, 64),
    (37, 1, 576, 37),      # 1: no rounding
    (700, 1, 576, 576),
])
def test_round_rank(rank, multiple, limit, expected):
    got = round_rank(rank, multiple, limit)
    assert got == expected and 1 <= got <= limit
    if multiple <= limit:
        assert got % multiple == 0


@pytest.mark.parametrize("bad", [7, 0, 2, 256, -8, True, 8.0, "8", None])
def test_bad_rank_multiples_name_the_value_and_what_is_allowed(bad):
    with pytest.raises(ValueError, match=r"rank multiple .* is not allowed; use one of 1, 8, 16, 32, 64, 128"):
        check_rank_multiple(bad)
    with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
        round_rank(10, bad, 64)


def test_round_rank_refuses_bad_ranks_and_limits():
    with pytest.raises(ValueError, match="rank=0"):
        round_rank(0, 8, 64)
    with pytest.raises(ValueError, match="limit=0"):
        round_rank(4, 8, 0)
    assert RANK_MULTIPLES == (1, 8, 16, 32, 64, 128)


# ----------------------------------------------------------------------------- the plan option
def test_rank_multiple_round_trips_through_yaml_dict_compact_and_rows(tmp_path):
    plan = parse_plan_string("attn:k0.8; rank_multiple=16; mlp:r20")
    assert plan.rank_multiple == 16 and [r.modules for r in plan.rules] == [["attn"], ["mlp"]]
    assert plan.to_dict()["rank_multiple"] == 16
    assert load_plan(plan.to_dict()) == plan
    assert load_plan(plan.to_yaml()) == plan
    assert load_plan("rank_multiple: 16\n" + yaml.safe_dump({"rules": plan.to_dict()["rules"]})) == plan
    for suffix in (".yaml", ".json"):
        path = tmp_path / f"plan{suffix}"
        plan.save(path)
        assert load_plan(str(path)) == plan
    assert plan_from_rows(rows_from_plan(plan), rank_multiple=16) == plan
    assert load_plan("rank-multiple:64; mlp:k0.5").rank_multiple == 64
    # a plan without rounding is written exactly as before
    assert load_plan("mlp:r8").to_dict() == {"rules": [{"layers": "all", "modules": ["mlp"], "rank": 8}]}
    assert "ranks rounded to multiples of 16" in plan.describe()


@pytest.mark.parametrize("source", ["mlp:k0.5; rank_multiple=7", "mlp:k0.5; rank_multiple=abc",
                                    {"rules": [{"modules": "mlp", "rank": 8}], "rank_multiple": 12},
                                    {"rules": [{"modules": "mlp", "rank": 8}], "rank_multiple": "16"}])
def test_bad_plan_rank_multiples_are_plan_errors(source):
    with pytest.raises(PlanError, match=r"rank.multiple.*1, 8, 16, 32, 64, 128"):
        load_plan(source)
    with pytest.raises(PlanError, match="rank multiple 3 is not allowed"):
        Plan(load_plan("mlp:r8").rules, rank_multiple=3)


def test_resolved_ranks_are_multiples_and_keep_the_planned_rank(tiny_linears):
    # keep 0.9 of gate/up/down (break-even 42): rank 38, rounded down to 32 (16) or up to 64 (64)
    for multiple, expected in ((1, 38), (8, 32), (16, 32), (32, 32), (64, 64)):
        got = resolve_plan(load_plan(f"mlp:k0.9; rank_multiple={multiple}"), tiny_linears)
        assert {a.rank for a in got.values()} == {expected}
        assert {a.planned_rank for a in got.values()} == ({None} if multiple == 1 else {38})
    # explicit ranks are rounded too; a 32-wide k/v keeps its rank under 64 (no aligned rank exists)
    got = resolve_plan(load_plan("attn:r20; rank_multiple=64"), tiny_linears)
    assert {a.info.module: a.rank for a in got.values()} == {"q_proj": 64, "o_proj": 64, "k_proj": 20,
                                                              "v_proj": 20}
    with pytest.raises(PlanError, match="exceeds min"):  # ranks are validated before rounding
        resolve_plan(load_plan("attn:r40; rank_multiple=8"), tiny_linears)


def test_accounting_follows_the_rounding(tiny_linears):
    config = tiny_config("llama")
    plain, rounded = account(config, "mlp:k0.9"), account(config, "mlp:k0.9; rank_multiple=16")
    assert plain.compressed - rounded.compressed == 6 * (38 - 32) * 192
    assert {r["planned_rank"] for r in rounded.rows} == {38} and {r["rank"] for r in rounded.rows} == {32}
    up = account(config, "mlp:k0.9; rank_multiple=64")  # 64 > break-even 42: warned, saying why
    assert any("rounded up from 38 to a multiple of 64" in w for w in up.warnings)


def test_plan_options_override_the_plans_own():
    plan = load_plan("mlp:k0.5; rank_multiple=16")
    assert PlanOptions().apply(plan) is plan
    assert PlanOptions(rank_multiple=64).apply(plan).rank_multiple == 64
    assert with_rank_multiple(plan, 1).rank_multiple == 1 and plan.rank_multiple == 16


# ----------------------------------------------------------------------------- the CLI flag
@pytest.mark.parametrize("argv", [
    ["count", "--model", "tiny", "--plan", "mlp:k0.5", "--rank-multiple", "7"],
    ["compress", "--model", "tiny", "--data", "chatterbot", "--plan", "mlp:k0.5", "--rank-multiple", "7"],
    ["compare", "--model", "tiny", "--student", "mlp:k0.5", "--rank-multiple", "7"],
])
def test_cli_bad_rank_multiple_is_rc_2_with_a_clear_message(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --rank-multiple: invalid choice: 7 (choose from 1, 8, 16, 32, 64, 128)" in err
    assert "Traceback" not in err


def test_cli_bad_rank_multiple_in_the_plan_is_rc_2(capsys):
    assert main(["count", "--model", "tiny", "--plan", "mlp:k0.5; rank_multiple=12"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "rank multiple '12' is not allowed" in err


def test_cli_rank_multiple_rounds_the_count_and_the_job(tmp_path, capsys):
    assert main(["count", "--model", "tiny", "--plan", "mlp:k0.9", "--rank-multiple", "16", "--json"]) == 0
    acc = json.loads(capsys.readouterr().out)
    assert {m["rank"] for m in acc["matrices"]} == {32} and {m["planned_rank"] for m in acc["matrices"]} == {38}
    args = build_parser().parse_args(["compress", "--model", "tiny", "--plan", "mlp:k0.9", "--rank-multiple", "8"])
    assert job_from_args(args).plan.rank_multiple == 8
    args = build_parser().parse_args(["compress", "--model", "tiny", "--plan", "mlp:k0.9; rank_multiple=16"])
    assert job_from_args(args).plan.rank_multiple == 16  # no flag: the plan's own
    kinds = CompareSpec(students=["mlp:k0.9"], plan=PlanOptions(rank_multiple=32)).kinds()
    assert kinds["mlp:k0.9"].rank_multiple == 32
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"source": "tiny"}, "data": {"source": "chatterbot"},
                                      "plan": {"rules": [{"modules": "mlp", "keep": 0.9}], "rank_multiple": 16}}))
    assert main(["run", str(recipe), "--dry-run", "--json"]) == 0
    assert {m["rank"] for m in json.loads(capsys.readouterr().out)["matrices"]} == {32}
    assert main(["run", str(recipe), "--dry-run", "--json", "--rank-multiple", "64"]) == 0
    assert {m["rank"] for m in json.loads(capsys.readouterr().out)["matrices"]} == {64}


# ----------------------------------------------------------------------------- timing (fields, not values)
def test_time_linear_returns_seconds_and_refuses_bad_shapes():
    for rank in (None, 1, 8):
        seconds = time_linear(16, 8, rank, tokens=4, repeats=2, max_seconds=0.05)
        assert isinstance(seconds, float) and seconds > 0
    with pytest.raises(ValueError, match="rank=9 is not allowed; use None \\(dense\\) or 1..8"):
        time_linear(16, 8, 9, tokens=4)
    with pytest.raises(ValueError, match="tokens=0"):
        time_linear(16, 8, None, tokens=0)


@pytest.mark.parametrize("shape", [(16, 8), (8, 24), (1, 5)])
def test_speed_breakeven_fields_are_consistent(shape):
    out_f, in_f = shape
    r = speed_breakeven(out_f, in_f, tokens=4, repeats=2, max_seconds=0.02)
    assert isinstance(r, SpeedBreakeven)
    assert (r.out_features, r.in_features, r.tokens, r.device, r.dtype) == (out_f, in_f, 4, "cpu", "float32")
    assert 0 <= r.rank <= r.max_rank == min(out_f, in_f)
    assert r.param_rank == out_f * in_f // (out_f + in_f) and r.shape == f"{out_f} x {in_f}"
    ranks = [p[0] for p in r.points]
    assert ranks == sorted(set(ranks)) and {1, r.max_rank} <= set(ranks) <= set(range(1, r.max_rank + 1))
    assert r.dense_seconds > 0 and all(s > 0 for _, s in r.points)
    timed = dict(r.points)  # the answer agrees with the timings it was decided on
    if r.rank:
        assert timed.get(r.rank, 0) <= r.dense_seconds
    if r.rank < r.max_rank:
        assert timed.get(r.rank + 1, float("inf")) > r.dense_seconds
    assert r.speedup(1) == r.dense_seconds / timed[1] and r.speedup(10 ** 6) is None
    assert json.loads(json.dumps(r.to_dict()))["shape"] == r.shape


def test_shape_groups_and_rows(tiny_linears):
    groups = shape_groups(tiny_linears)
    assert [(g.shape, g.modules, len(g.names)) for g in groups] == [
        ("64 x 64", ("q_proj", "o_proj"), 4), ("32 x 64", ("k_proj", "v_proj"), 4),
        ("128 x 64", ("gate_proj", "up_proj"), 4), ("64 x 128", ("down_proj",), 2), ("259 x 64", ("lm_head",), 1)]
    calls = []
    measured = measure_shapes(groups[:1], tokens=(3, 1), progress=lambda d, t, m: calls.append((d, t)),
                              repeats=1, max_seconds=0.01)
    assert set(measured) == {(64, 64, 3), (64, 64, 1)} and calls[-1] == (2, 2)
    ranks = {a.info.name: a.rank for a in resolve_plan(load_plan("0:attn:r8"), tiny_linears).values()}
    rows = speed_rows(groups, measured, {"plan rank": ranks}, tokens=(3, 1))
    assert rows[0]["plan rank"] == "8 (2 of 4 dense)" and rows[2]["plan rank"] == "dense"
    assert rows[0]["parameter break-even rank"] == 32
    assert rows[0]["speed break-even rank (prefill 3 tok)"] == measured[(64, 64, 3)].rank
    assert rows[1]["speed break-even rank (decode 1 tok)"] is None  # not measured


# ----------------------------------------------------------------------------- the Budget page
def speed_table(at):
    """The Budget page's speed break-even table (a DataFrame) or None (AppTest does not expose a plain
    dataframe's key: it is the table with a 'parameter break-even rank' column)."""
    return next((d.value for d in at.dataframe if "parameter break-even rank" in getattr(d.value, "columns", ())),
                None)


def test_budget_rounding_changes_the_accounting_and_the_stored_plan():
    at = started("pages/budget.py")
    original = 90_624
    plain = original - 6 * 128 * 64 + 6 * 38 * 192  # default rows: mlp keep 0.9 -> rank 38
    assert metrics(at)["after the plan"] == f"{plain:,}"
    at.selectbox(key="budget_rank_multiple").set_value(16).run()
    assert not at.exception, at.exception
    assert metrics(at)["after the plan"] == f"{original - 6 * 128 * 64 + 6 * 32 * 192:,}"
    assert at.session_state["lowrank_plan"]["plan"].rank_multiple == 16
    at.switch_page("pages/spectra.py").run()
    at.switch_page("pages/budget.py").run()  # the choice survives leaving the page (from the stored plan)
    assert at.selectbox(key="budget_rank_multiple").value == 16
    at.text_area(key="budget_import").set_value("mlp:k0.9; rank_multiple=64").run()
    at.button(key="budget_import_btn").click().run()
    assert at.selectbox(key="budget_rank_multiple").value == 64
    assert "rounded up from 38 to a multiple of 64" in "\n".join(str(t.value) for t in at.text)


def test_budget_measures_speed_only_on_click_and_keeps_it_for_the_session():
    at = started("pages/budget.py")
    assert speed_table(at) is None
    assert "Measure speed on this machine" in texts(at.info)
    at.button(key="budget_speed_go").click().run()
    assert not at.exception, at.exception
    table = speed_table(at)
    assert table["shape"].tolist() == ["64 x 64", "32 x 64", "128 x 64", "64 x 128", "259 x 64"]
    assert table["parameter break-even rank"].tolist() == [32, 21, 42, 42, 51]
    for column in ("speed break-even rank (prefill 512 tok)", "speed break-even rank (decode 1 tok)"):
        assert all(0 <= v <= m for v, m in zip(table[column].tolist(), [64, 32, 64, 64, 64]))
    assert table["plan rank"].tolist() == ["dense", "dense", "38", "38", "dense"]
    at.selectbox(key="budget_rank_multiple").set_value(32).run()  # no new timing: the session keeps it
    assert not at.status
    table = speed_table(at)
    assert table["plan rank"].tolist() == ["dense", "dense", "32", "32", "dense"]
