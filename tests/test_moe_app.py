"""The app's pages on a tiny Mixtral: every page draws, Spectra picks an expert and draws one heatmap column per
expert's linear, Compress builds a student of the experts, Evaluate scores it, Export writes it."""
from __future__ import annotations

import pytest

from test_app import _run_entrypoint_every_time, compressed, finish_job, metrics, plotly_specs, started, texts

PAGES = ("pages/model_data.py", "pages/budget.py", "pages/search.py", "pages/spectra.py", "pages/compress.py",
         "pages/evaluate.py", "pages/export.py")


@pytest.fixture(autouse=True)
def tiny_env(monkeypatch, tmp_path):   # test_app's environment, with a mixture-of-experts model
    _run_entrypoint_every_time(monkeypatch)
    monkeypatch.setenv("LOWRANK_APP_MODEL", "tiny-mixtral")
    monkeypatch.setenv("LOWRANK_APP_DATA", "chatterbot")
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LOWRANK_WORKSPACE", str(tmp_path / "workspace"))


@pytest.mark.parametrize("source", ["tiny-mixtral", "tiny-qwen3_moe"])
def test_every_page_draws_for_a_mixture_of_experts_model(source, monkeypatch):
    monkeypatch.setenv("LOWRANK_APP_MODEL", source)
    for page in PAGES:
        at = started(page)
        assert not at.error, (page, texts(at.error))


def test_spectra_page_picks_an_expert_and_the_heatmap_has_a_column_per_experts_linear():
    at = started("pages/spectra.py")
    at.selectbox(key="spectra_expert").set_value(2).run()
    at.button(key="spectra_go").click().run()
    assert not at.exception, at.exception
    assert [t["name"] for t in plotly_specs(at)["spectra_chart"]["data"]] == ["L1 weight"] * 2 + \
        ["L1 activation-aware"] * 2
    at.button(key="heat_go").click().run()
    assert not at.exception, at.exception
    heat = plotly_specs(at)["heat_chart"]["data"][0]
    assert "experts.3.down_proj" in heat["x"] and "q_proj" in heat["x"]


def test_compress_evaluate_and_export_the_experts():
    at = compressed("experts:r4")
    assert not at.error, texts(at.error)
    at.switch_page("pages/evaluate.py").run()
    at.button(key="eval_go").click().run()
    at = finish_job(at)
    assert not at.exception, at.exception
    at.switch_page("pages/export.py").run()
    at.radio(key="export_format").set_value("factorized").run()
    at.text_input[0].set_value("student")
    at.button(key="export_go").click().run()
    assert "Verified" in texts(at.success), texts(at.error)
    assert metrics(at)["parameters stored"]


def test_search_page_finds_per_expert_ranks_and_opens_them_as_a_plan():
    from lowrank_core.linears import linear_map
    from lowrank_core.models import load_model
    from lowrank_core.plan import load_plan, resolve_plan

    at = started("pages/search.py")
    at.number_input(key="search_val").set_value(4)
    at.button(key="search_go").click().run()
    assert not at.exception and not at.error, (at.exception, texts(at.error))
    assert at.session_state["lowrank_pending_search"].wait(120)
    at.run()
    result = at.session_state["lowrank_search"]["result"]
    assert any(".experts." in name for name in result.ranks_at(result.path_length))
    at.button(key="search_open").click().run()
    at.switch_page("pages/compress.py").run()
    linears = linear_map(load_model("tiny-mixtral", device="cpu").model)
    shown = resolve_plan(load_plan(at.text_area(key="compress_plan").value.strip()), linears)
    assert {name: a.rank for name, a in shown.items()} == result.ranks_at(result.steps)
