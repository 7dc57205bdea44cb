"""AppTest checks of the Search page (rank allocation) on the tiny random model and the chatterbot corpus."""
from __future__ import annotations

import pytest

from streamlit.testing.v1 import AppTest

from test_app import (finish_job, hold_back, metrics, plotly_specs, started, texts,  # noqa: F401
                      tiny_env)  # tiny_env: the autouse fixture (tiny model, chatterbot, a tmp cache)

PAGE = "pages/search.py"
VAL = 8  # validation examples asked on the page (tiny: max 128 tokens per example)


@pytest.fixture(autouse=True)
def forget_teacher_scores():
    """A search memoises the teacher's evaluation scores process-wide (the Model & data and Evaluate pages
    reuse them); forget them afterwards, so tests of other files start as a fresh server would."""
    yield
    from ui import cache

    cache.forget("teacher_eval")


def searched(at: AppTest | None = None, **widgets) -> AppTest:
    """Open the Search page, set ``widgets`` ({key: value}), press Search and wait for the background job."""
    at = at or started(PAGE)
    if at.title[0].value != "Search":
        at.switch_page(PAGE).run()
    for key, value in {"search_val": VAL, **widgets}.items():
        at.number_input(key=key).set_value(value) if isinstance(value, (int, float)) else \
            at.text_input(key=key).set_value(value)
    at.button(key="search_go").click().run()
    assert not at.exception, at.exception
    assert not at.error, texts(at.error)
    job = at.session_state["lowrank_pending_search"]
    assert job.wait(120)
    at.run()
    assert not at.exception, at.exception
    assert "lowrank_pending_search" not in at.session_state
    return at


def engine_search(budget="1%", eval_n=32):
    """The same search straight through the engine (the CLI's calls): result and evaluation scores."""
    from lowrank_core.allocate import SearchSettings, allocate, fitting_examples
    from lowrank_core.compress import CompressSettings
    from lowrank_core.data import make_split
    from lowrank_core.evaluate import evaluate_models
    from lowrank_core.models import load_model

    lm = load_model("tiny", device="cpu")
    split = make_split("chatterbot", n_calib=16, n_eval=32, n_val=4 * VAL, seed=0)
    val = fitting_examples(lm.tokenizer, split.val, VAL, 128)
    settings = SearchSettings(val_max_len=128, compression=CompressSettings(calib=16, max_len=128, seed=0))
    result = allocate(lm.model, lm.tokenizer, split.calib, val, budget=budget, settings=settings)
    scores = evaluate_models({"teacher": lm.model, "student": result.student}, lm.tokenizer, split.eval[:eval_n],
                             batch_size=1, max_len=128)
    return lm, result, scores


def test_search_page_renders_its_controls():
    at = started(PAGE)
    assert at.title[0].value == "Search"
    assert not at.error, texts(at.error)
    assert at.text_input(key="search_budget").value == "1%"
    assert at.selectbox(key="search_probe").value == "layer"
    assert at.number_input(key="search_val").value == 32  # the CLI's default: the settings hold no val side
    assert at.number_input(key="search_calib").value == 16  # the app's settings (tiny)
    assert at.number_input(key="search_eval").value == 32
    assert at.number_input(key="search_max_verify").value == 8
    assert "No search yet in this session" in texts(at.info)
    assert "validation side" in texts(at.caption)
    assert "90,624 parameters" in texts(at.sidebar.markdown)
    at.radio(key="search_goal").set_value("Parameter target").run()
    assert at.number_input(key="search_keep").value == 0.8


def test_search_finishes_draws_the_pareto_chart_and_table_like_the_engine():
    at = searched(search_eval=20)
    found = at.session_state["lowrank_search"]
    result = found["result"]
    _, expected, scores = engine_search(eval_n=20)
    assert result.steps == expected.steps and result.ranks == expected.ranks
    assert [r["params"] for r in result.pareto] == [r["params"] for r in expected.pareto]
    assert result.val_loss == pytest.approx(expected.val_loss, abs=1e-9)
    assert found["evaluation"]["student"].loss == pytest.approx(scores["student"].loss, abs=1e-6)
    assert found["evaluation"]["teacher"].examples == 20
    assert metrics(at)["parameters after"] == f"{expected.params_after:,}"

    figure = plotly_specs(at)["search_pareto"]
    traces = {t["name"]: t for t in figure["data"]}
    assert set(traces) == {"predicted validation loss", "measured validation loss", "found point", "chosen point",
                           "evaluation loss"}
    assert len(traces["predicted validation loss"]["x"]) == len(result.pareto)
    assert traces["measured validation loss"]["y"] == [r["val_loss"] for r in result.pareto if r["verified"]]
    assert traces["evaluation loss"]["y"] == pytest.approx([scores["teacher"].loss, scores["student"].loss], abs=1e-6)
    lines = [shape["y0"] for shape in figure["layout"]["shapes"]]
    assert lines == pytest.approx([result.teacher_loss, result.teacher_loss + result.budget])

    table = at.dataframe[0].value  # the Pareto rows (the per-matrix table follows)
    assert table["steps"].tolist() == [r["steps"] for r in result.pareto]
    assert table["kept"].tolist() == pytest.approx([r["kept"] for r in result.pareto])

    at.switch_page("pages/budget.py").run()  # navigating away and back keeps the finished search
    at.switch_page(PAGE).run()
    assert not at.exception, at.exception
    assert "search_pareto" in plotly_specs(at)
    assert at.session_state["lowrank_search"]["result"] is result
    other = started(PAGE)  # another browser session never sees it
    assert "No search yet in this session" in texts(other.info) and not other.get("plotly_chart")


def test_parameter_target_search_stops_at_the_target():
    from lowrank_core.allocate import decoder_target
    from lowrank_core.models import load_model

    at = started(PAGE)
    at.radio(key="search_goal").set_value("Parameter target").run()
    at = searched(at, search_keep=0.5)
    result = at.session_state["lowrank_search"]["result"]
    target = decoder_target(load_model("tiny", device="cpu").model, 0.5)
    assert result.target_params == target and result.budget is None
    assert result.params_after <= target
    assert [s["x0"] for s in plotly_specs(at)["search_pareto"]["layout"]["shapes"] if s["type"] == "line"
            and s["x0"] == s["x1"]] == pytest.approx([target / result.params_before])
    assert at.number_input(key="search_keep").value == 0.5  # the submitted choices come back


def test_bad_budget_is_an_error_and_runs_nothing():
    at = started(PAGE)
    at.text_input(key="search_budget").set_value("a lot").run()
    at.button(key="search_go").click().run()
    assert not at.exception, at.exception
    assert "bad loss budget 'a lot'" in texts(at.error)
    assert "lowrank_pending_search" not in at.session_state
    assert "lowrank_search" not in at.session_state
    assert not at.get("plotly_chart")


def test_opening_a_point_puts_that_plan_on_the_compress_and_budget_pages():
    from lowrank_core.linears import linear_map
    from lowrank_core.models import load_model
    from lowrank_core.plan import load_plan, resolve_plan

    at = started("pages/budget.py")  # the Budget page has rows of its own before the search
    at = searched(at)
    result = at.session_state["lowrank_search"]["result"]
    row = next(r for r in result.pareto if 0 < r["steps"] != result.steps and r["steps"] < result.path_length)
    at.selectbox(key="search_point_1").set_value(row["steps"]).run()
    traces = {t["name"]: t for t in plotly_specs(at)["search_pareto"]["data"]}
    assert traces["chosen point"]["x"] == [pytest.approx(row["kept"])]
    at.button(key="search_open").click().run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Compress"
    at.switch_page("pages/compress.py").run()  # AppTest's later runs stay on the page the test chose last
    stored = at.session_state["lowrank_plan"]
    assert stored["source"].startswith("Search page")
    assert stored["plan"].to_dict() == result.plan_at(row["steps"]).to_dict()
    linears = linear_map(load_model("tiny", device="cpu").model)
    shown = resolve_plan(load_plan(at.text_area(key="compress_plan").value.strip()), linears)
    assert {name: a.rank for name, a in shown.items()} == result.ranks_at(row["steps"])
    at.form_submit_button[0].click().run()
    finish_job(at)
    assert not at.error, texts(at.error)
    assert metrics(at)["parameters after"] == f"{row['params']:,}"
    at.switch_page("pages/budget.py").run()  # the Budget page shows the opened plan, not its old rows
    assert not at.exception, at.exception
    assert metrics(at)["after the plan"] == f"{row['params']:,}"
    assert at.session_state["lowrank_plan"]["plan"].to_dict() == result.plan_at(row["steps"]).to_dict()


def test_search_runs_in_the_background_with_progress(monkeypatch):
    import lowrank_core.search_job

    release = hold_back(monkeypatch, lowrank_core.search_job, "allocate")
    at = started(PAGE)
    at.number_input(key="search_val").set_value(VAL)
    at.button(key="search_go").click().run()
    assert not at.exception, at.exception
    assert "Searching: budget 1%" in at.status[0].label
    assert [b.key for b in at.button] == ["search_stop"]  # no second search while one runs
    at.switch_page("pages/budget.py").run()  # leaving the page neither stops nor restarts the search
    assert "search is running in the background" in texts(at.sidebar.caption)
    job = at.session_state["lowrank_pending_search"]
    release.set()
    assert job.wait(60)
    at.switch_page(PAGE).run()
    assert not at.exception, at.exception
    assert "search_pareto" in plotly_specs(at)
    assert at.number_input(key="search_val").value == VAL  # the submitted choices come back


def test_stop_cancels_a_running_search(monkeypatch):
    import lowrank_core.allocate.search as search_mod

    release = hold_back(monkeypatch, search_mod, "build_profile")  # allocate's first step waits
    at = started(PAGE)
    at.number_input(key="search_val").set_value(VAL)
    at.button(key="search_go").click().run()
    job = at.session_state["lowrank_pending_search"]
    at.button(key="search_stop").click().run()
    assert job.stop_requested
    release.set()
    assert job.wait(60) and job.cancelled
    at.run()
    assert not at.exception, at.exception
    assert "Search stopped on request: nothing was kept." in texts(at.error)
    assert "lowrank_search" not in at.session_state


def test_a_failed_search_shows_why(monkeypatch):
    import lowrank_core.search_job

    def broken(*args, **kwargs):
        raise ValueError("the validation batches hold no answer tokens")

    monkeypatch.setattr(lowrank_core.search_job, "allocate", broken)
    at = started(PAGE)
    at.number_input(key="search_val").set_value(VAL)
    at.button(key="search_go").click().run()
    shown = texts(at.error)  # the job fails at once: usually within the click's own reruns
    if "lowrank_pending_search" in at.session_state:
        assert at.session_state["lowrank_pending_search"].wait(60)
        shown = texts(at.run().error)
    assert not at.exception, at.exception
    assert "Search failed: the validation batches hold no answer tokens" in shown
    assert "lowrank_search" not in at.session_state
