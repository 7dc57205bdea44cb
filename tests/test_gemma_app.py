"""Every page of the app on a tiny Gemma (2 and 3 text): map, budget, spectra, compress, evaluate, export, search."""
from __future__ import annotations

import pytest

from test_app import compressed, metrics, plotly_specs, started, texts, tiny_env  # noqa: F401  (autouse)


@pytest.fixture(autouse=True)
def forget_teacher_scores():
    yield
    from ui import cache

    cache.forget("teacher_eval")


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_every_page_works_on_a_tiny_gemma(monkeypatch, arch):
    from lowrank_core.models import tiny_model
    from lowrank_core.workspace import workspace_dir

    monkeypatch.setenv("LOWRANK_APP_MODEL", f"tiny-{arch}")
    params = tiny_model(arch)[0].num_parameters()
    at = started()
    assert metrics(at)["linears"] == "15"  # 2 layers x 7 + tied lm_head
    assert f"{params:,} parameters" in texts(at.sidebar.markdown)
    for page in ("pages/budget.py", "pages/spectra.py"):
        at.switch_page(page).run()
        assert not at.exception and not at.error, (page, at.exception, texts(at.error))
    assert "spectra_chart" in plotly_specs(at)
    at = compressed("all:r8", method="whitened")
    assert not at.error, texts(at.error)
    at.switch_page("pages/evaluate.py").run()
    at.button(key="eval_go").click().run()
    assert at.session_state["lowrank_pending_compare"].wait(120)
    at.run()
    assert not at.exception and not at.error, (at.exception, texts(at.error))
    assert "top-1 agreement" in metrics(at)
    at.switch_page("pages/export.py").run()
    at.radio(key="export_format").set_value("factorized").run()
    at.text_input[0].set_value("student")
    at.button(key="export_go").click().run()
    assert not at.exception and "Verified" in texts(at.success), texts(at.error)
    assert (workspace_dir() / "student" / "modeling_lowrank.py").is_file()
    at.switch_page("pages/search.py").run()
    at.number_input(key="search_val").set_value(4)
    at.button(key="search_go").click().run()
    assert not at.exception and not at.error, (at.exception, texts(at.error))
    assert at.session_state["lowrank_pending_search"].wait(120)
    at.run()
    assert not at.exception and not at.error, (at.exception, texts(at.error))
