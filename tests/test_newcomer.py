"""What a newcomer found: silent bad runs (calibration warnings), progress that tracks the work, readable
charts on the Compress page, per-row Budget errors, a readable Export page."""
from __future__ import annotations

import json

import pytest

from lowrank_core.compress import CompressSettings, calibration_warnings, compress
from test_app import compressed, metrics, plotly_specs, started, texts, tiny_env  # noqa: F401  (tiny_env: autouse)


@pytest.fixture(scope="module")
def tiny():
    from lowrank_core.data import make_split
    from lowrank_core.models import load_model

    lm = load_model("tiny", device="cpu")
    return lm, make_split("chatterbot", n_calib=16, n_eval=4, n_val=0, seed=0)


def frame(at, column: str):
    """The first st.dataframe with ``column``."""
    return next(d for d in at.dataframe if column in d.value.columns)


# ----------------------------------------------------------------------------- 1. calibration warnings
def test_too_few_fit_tokens_and_a_tiny_held_out_set_are_warned_before_the_work(tiny):
    lm, split = tiny
    heard = []
    result = compress(lm.model, lm.tokenizer, "all:k0.9", split.calib, CompressSettings(calib=4, max_len=16),
                      progress=lambda d, t, m="": heard.append(("progress", m)),
                      warn=lambda m: heard.append(("warn", m)))
    assert result.split["fit_tokens"] < 128 and result.warnings == result.to_dict()["warnings"]
    down, small, held = result.warnings
    assert "fewer tokens than their 128 inputs" in down and "model.layers.0.down_in" in down
    assert "model.layers.1.mlp.down_proj" in down and "add calibration examples" in down
    assert f"{result.split['fit_tokens']:,} tokens" in down
    assert "than their 64 inputs" in small
    assert "held-out check is 1 example(s) of 16 tokens" in held
    kinds = [k for k, m in heard if k == "warn" or "calibration Grams" in m]
    assert kinds[:3] == ["warn"] * 3 and "progress" in kinds  # warned before any Gram is taken


def test_enough_calibration_warns_nothing(tiny):
    lm, split = tiny
    assert compress(lm.model, lm.tokenizer, "mlp:r8", split.calib, CompressSettings(calib=16)).warnings == []


def test_warnings_need_grams_and_name_an_empty_held_out_set(tiny):
    from lowrank_core.linears import linear_map
    from lowrank_core.plan import load_plan, resolve_plan

    lm, _ = tiny
    info = {"fit_examples": 1, "fit_tokens": 10, "held_out_examples": 0, "held_out_tokens": 0}
    svd = resolve_plan(load_plan("mlp:r8"), linear_map(lm.model), "svd")  # no Gram: few tokens do not matter
    only = calibration_warnings(info, svd)
    assert len(only) == 1 and "empty" in only[0]
    assert calibration_warnings({"fit_tokens": 10_000, "held_out_examples": 5, "held_out_tokens": 900}, svd) == []


def test_cli_prints_the_calibration_warnings_and_puts_them_in_the_json(capsys):
    from lowrank_core import cli

    assert cli.main(["compress", "--model", "tiny", "--data", "chatterbot", "--calib", "4", "--eval", "0",
                     "--max-len", "64", "--plan", "mlp:r8", "--json"]) == 0
    out = capsys.readouterr()
    record = json.loads(out.out)
    assert record["compress"]["warnings"] and set(record["compress"]["warnings"]) <= set(record["warnings"])
    assert "warning: the held-out check is 1 example" in out.err


# ----------------------------------------------------------------------------- 2. progress from the start
def test_progress_moves_per_calibration_example_from_the_start(tiny):
    lm, split = tiny
    calls = []
    result = compress(lm.model, lm.tokenizer, "mlp:r8", split.calib, CompressSettings(calib=16),
                      progress=lambda d, t, m="": calls.append((d, t, m)))
    assert calls[0] == (0, 1, "preparing calibration batches")
    grams = [(d, t) for d, t, m in calls if m.startswith("calibration Grams")]
    n = result.split["fit_examples"] + result.split["held_out_examples"]
    assert grams == [(i, n) for i in range(n + 1)]  # one bar, 0 first, one step per example (CPU: unpadded)


def test_layerwise_progress_reports_the_input_capture(tiny):
    lm, split = tiny
    calls = []
    compress(lm.model, lm.tokenizer, "mlp:r8", split.calib, CompressSettings(calib=8, layerwise=True),
             progress=lambda d, t, m="": calls.append((d, t, m)))
    embed = [(d, t) for d, t, m in calls if m.startswith("embedding calibration batches")]
    assert embed[0][0] == 0 and embed[-1][0] == embed[-1][1] > 0


# ----------------------------------------------------------------------------- 3. charts
def test_hidden_mse_axis_has_decades_and_exact_layers_and_errors_are_percent():
    from ui import charts

    fig = charts.line_chart({"rel_mse": [0.002, 0.05, 0.3]}, "t", "layer", "rel_mse", log=True, x=[0, 1, 2])
    assert fig.layout.yaxis.dtick == 1 and fig.layout.yaxis.exponentformat == "power"
    assert list(fig.layout.xaxis.range) == [0, 2]
    rows = [{"name": f"model.layers.{i}.mlp.down_proj", "module": "down_proj", "rel_error": 0.6273} for i in range(3)]
    bars = charts.error_bars(rows)
    assert bars.layout.xaxis.title.text.startswith("matrix") and "relative output error" in bars.layout.yaxis.title.text
    assert bars.layout.yaxis.tickformat == ".1%" and "%{y:.3%}" in bars.data[0].hovertemplate


def test_compress_page_warns_and_shows_relative_errors_in_percent():
    at = compressed("mlp:r8", compress_calib=4)
    assert not at.error, texts(at.error)
    assert "held-out check is 1 example" in texts(at.warning)
    specs = plotly_specs(at)
    assert specs["compress_errors"]["layout"]["yaxis"]["tickformat"] == ".1%"
    assert specs["compress_mse"]["layout"]["xaxis"]["range"] == [0, 1]
    config = json.loads(frame(at, "rel_error").proto.columns)
    assert config["rel_error"]["type_config"]["format"] == "percent"


def test_a_good_run_shows_no_calibration_warning():
    at = compressed("mlp:r8")
    assert "fewer tokens than" not in texts(at.warning)


# ----------------------------------------------------------------------------- 4. budget
def row(layers: str, modules: str, rank: int = 8) -> dict:
    return {"layers": layers, "modules": modules, "rank": rank, "keep": None, "dense": False, "method": ""}


def edited(at, changes: dict, added: list | None = None):
    at.session_state["budget_editor_0"] = {"edited_rows": changes, "added_rows": added or [], "deleted_rows": []}
    at.run()
    assert not at.exception, at.exception
    return at


def test_budget_rank_zero_is_an_error_next_to_its_row_and_the_rest_is_counted():
    at = edited(started("pages/budget.py"), {0: {"keep": None, "rank": 0}},
                [row("all", "attn")])
    assert "row 1 (layers all, modules mlp, rank 0): rank 0 is below 1" in texts(at.error)
    # the valid row still counts: attention at rank 8
    from lowrank_core.models import load_config
    from lowrank_core.plan import account

    assert metrics(at)["after the plan"] == f"{account(load_config('tiny'), 'attn:r8').compressed:,}"
    assert at.button(key="budget_save").disabled
    assert "Saving is disabled" in texts(at.warning)
    assert "has an error" in texts(at.sidebar.error) and "rule(s) from" not in texts(at.sidebar.caption)


def test_budget_out_of_range_layer_keeps_counts_presets_and_save():
    at = edited(started("pages/budget.py"), {}, [row("40", "attn")])
    assert "row 2" in texts(at.error) and "unknown layer 40" in texts(at.error)
    assert metrics(at)["matrices replaced"] == "6"  # the first row (mlp, keep 0.9) still counted
    assert frame(at, "scenario").value["scenario"].iloc[-1] == "This plan (valid rows)"
    assert at.button(key="budget_save").disabled
    assert "unknown layer 40" in texts(at.sidebar.error)


# ----------------------------------------------------------------------------- 5. export
def test_export_shows_a_rank_table_and_both_sizes():
    at = compressed("mlp:r8")
    at.switch_page("pages/export.py").run()
    assert not at.exception, at.exception
    info = texts(at.info)
    assert "as large as the teacher" in info and "90,624 parameters" in info
    assert f"{90_624 - 6 * 128 * 64 + 6 * 8 * 192:,} parameters" in info
    at.text_input[0].set_value("dense-student")
    at.button(key="export_go").click().run()
    assert "Verified" in texts(at.success), texts(at.error)
    ranks = frame(at, "matrix").value
    assert list(ranks.columns) == ["matrix", "rank"] and len(ranks) == 6 and set(ranks["rank"]) == {8}
    assert "the teacher's size" in texts(at.caption)


def test_held_out_fraction_is_a_calibration_setting_of_every_method():
    at = compressed("mlp:r8", "whitened", compress_valid=0.5)
    assert not at.error, texts(at.error)
    job = at.session_state["lowrank_results"][at.session_state["lowrank_current_job"]]
    assert job.spec.method.valid_fraction == 0.5
    assert job.compressed.split["held_out_examples"] == 8 and job.compressed.split["fit_examples"] == 8
    assert not [n for n in at.number_input if n.key == "refit_valid"]  # no longer hidden under refit settings


def test_evaluate_says_how_many_examples_were_skipped_and_why():
    import dataclasses

    from ui import state

    at = compressed("mlp:r8")
    settings = at.session_state[state.SETTINGS_KEY]
    at.session_state[state.SETTINGS_KEY] = dataclasses.replace(settings, max_len=44)
    at.switch_page("pages/evaluate.py").run()
    at.button(key="eval_go").click().run()
    assert at.session_state["lowrank_pending_compare"].wait(120)
    at.run()
    assert not at.exception, at.exception
    (comparison,) = at.session_state["lowrank_comparisons"].values()
    assert 0 < comparison.skipped and comparison.examples + comparison.skipped <= 32
    caption = texts(at.caption)
    assert f"{comparison.examples} examples" in caption
    assert f"{comparison.skipped} skipped because the prompt alone filled the 44 tokens" in caption
    runs = at.dataframe[-1].value
    assert runs.loc[0, "eval_examples"] == comparison.examples  # the runs table counts what was scored
