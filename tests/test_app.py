"""AppTest checks of every page on the tiny random model and the chatterbot corpus."""
from __future__ import annotations

from pathlib import Path

import pytest

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")
SEED_NUMBERS = (7_241_748_480, 173_867_040, 6_162_305_024, 4_935_372_800, 7_066_472_448)


@pytest.fixture(autouse=True)
def tiny_env(monkeypatch, tmp_path):
    _run_entrypoint_every_time(monkeypatch)
    monkeypatch.setenv("LOWRANK_APP_MODEL", "tiny")
    monkeypatch.setenv("LOWRANK_APP_DATA", "chatterbot")
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))


def _run_entrypoint_every_time(monkeypatch) -> None:
    """AppTest resets Streamlit's "pages/ directory" flag before every run, so with a ``pages/`` folder
    its reruns execute the page file alone (the v1 multipage mode). A real server drops that mode for
    good once ``st.navigation`` is called; mirror that so every run executes ``app.py``."""
    from streamlit.runtime.pages_manager import PagesManager

    original = PagesManager.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        PagesManager.uses_pages_directory = False

    monkeypatch.setattr(PagesManager, "__init__", init)


def started(page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    if page:
        at.switch_page(page)
        at.run()
        assert not at.exception, at.exception
    return at


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def test_model_page_shows_architecture_map_and_sidebar():
    at = started()
    assert at.title[0].value == "Model & data"
    assert metrics(at)["linears"] == "15"  # 2 layers x 7 + tied lm_head
    names = at.dataframe[0].value["name"].tolist()
    assert names[0] == "model.layers.0.self_attn.q_proj" and names[-1] == "lm_head"
    side = texts(at.sidebar.markdown)
    assert "90,624 parameters" in side and "CPU" in side and "float32" in side
    assert "calib **16** · val **8** · eval **32**" in side


def test_model_page_scores_teacher_like_the_engine():
    from lowrank_core.data import make_split
    from lowrank_core.evaluate import evaluate
    from lowrank_core.models import load_model

    at = started()
    at.button(key="score_teacher").click().run()
    assert not at.exception, at.exception
    lm = load_model("tiny", device="cpu")
    split = make_split("chatterbot", n_calib=16, n_eval=32, n_val=8, seed=0)
    expected = evaluate(lm.model, lm.tokenizer, split.eval, max_len=128)
    assert metrics(at)["teacher answer loss"] == f"{expected.loss:.4f}"
    assert metrics(at)["answer tokens"] == f"{expected.tokens:,}"


def test_model_page_apply_changes_the_split_everywhere():
    at = started()
    at.number_input(key="data_eval").set_value(12).run()
    at.button(key="apply_settings").click().run()
    assert not at.exception, at.exception
    assert "eval **12**" in texts(at.sidebar.markdown)
    at.switch_page("pages/budget.py").run()
    assert "eval **12**" in texts(at.sidebar.markdown)


def test_bad_model_source_is_a_clear_error():
    at = started()
    at.selectbox(key="model_kind").set_value("Local folder, config.json or .gguf").run()
    at.text_input(key="model_text").set_value("/nonexistent/model").run()
    at.button(key="apply_settings").click().run()
    assert not at.exception, at.exception
    assert "/nonexistent/model" in texts(at.error) and "not found" in texts(at.error)


def test_budget_shows_the_seed_numbers_for_the_mistral_config():
    at = started("pages/budget.py")
    at.radio(key="budget_target").set_value("Mistral-7B-OpenOrca — config only (seed fixture)").run()
    assert not at.exception, at.exception
    assert metrics(at)["original parameters"] == f"{SEED_NUMBERS[0]:,}"
    presets = at.dataframe[-1].value  # the presets table closes the page
    assert set(SEED_NUMBERS) <= set(presets["parameters"].tolist())


def test_budget_counts_the_edited_plan_and_stores_it():
    at = started("pages/budget.py")
    at.session_state["budget_editor_0"] = {"edited_rows": {0: {"keep": None, "rank": 8}},
                                           "added_rows": [], "deleted_rows": []}
    at.run()
    assert not at.exception, at.exception
    # tiny: 2 layers x MLP (gate, up: 128x64; down: 64x128) at rank 8 -> 6 x 8 x 192 parameters
    original = 90_624
    compressed = original - 2 * 3 * 128 * 64 + 6 * 8 * 192
    assert metrics(at)["after the plan"] == f"{compressed:,}"
    plan = at.session_state["lowrank_plan"]["plan"]
    assert [(r.modules, r.rank) for r in plan.rules] == [(["mlp"], 8)]


def test_budget_bad_rule_shows_the_plan_error():
    at = started("pages/budget.py")
    at.session_state["budget_editor_0"] = {"edited_rows": {0: {"keep": None, "rank": 0}},
                                           "added_rows": [], "deleted_rows": []}
    at.run()
    assert not at.exception, at.exception
    assert "rank 0 is below 1" in texts(at.error)


def test_budget_warns_about_ranks_above_break_even():
    at = started("pages/budget.py")
    at.text_area(key="budget_import").set_value("attn:r40").run()
    at.button(key="budget_import_btn").click().run()
    assert not at.exception, at.exception
    # q/o are 64x64 (break-even 32), k/v 32x64 (break-even 21): rank 40 > both, max rank 32 for k/v -> error
    assert "exceeds min(out, in) = 32" in texts(at.error)
    at.text_area(key="budget_import").set_value("q_proj,o_proj:r40").run()
    at.button(key="budget_import_btn").click().run()
    assert "above break-even" in texts(at.warning)
