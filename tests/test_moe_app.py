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


def test_every_page_draws_for_a_mixture_of_experts_model():
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
