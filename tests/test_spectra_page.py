"""The Spectra page: nothing heavy before a click, choices that survive a page switch, a short toggle label,
the heatmap's ranks as a plan on the Budget page, decade-only log axes (AppTest on the tiny model)."""
from __future__ import annotations

import numpy as np
import pytest

from lowrank_core.linears import linear_map
from lowrank_core.models import load_model
from lowrank_core.plan import plan_from_rows, resolve_plan
from lowrank_core.spectra import Spectrum, energy_rank_table, model_spectra, plan_for_energy
from ui import state
from ui.charts import spectrum_figure
from test_app import plotly_specs, started, texts, tiny_env  # noqa: F401  (tiny_env: autouse)


@pytest.fixture(autouse=True)
def fresh_memory():
    """Grams and heatmap spectra live in the process-wide cache: start and leave each test without them."""
    from ui import cache

    for kind in ("gram", "all_spectra"):
        cache.forget(kind)
    yield
    for kind in ("gram", "all_spectra"):
        cache.forget(kind)


def traces(at) -> list[str]:
    return [t["name"] for t in plotly_specs(at)["spectra_chart"]["data"]]


def test_opening_the_page_calibrates_nothing_until_compute_is_clicked():
    at = started("pages/spectra.py")
    assert not at.error, texts(at.error)
    assert not at.status  # no calibration pass ran
    assert traces(at) == ["L1 weight"] * 2  # the weight spectrum shows at once
    assert "Compute spectra" in texts(at.info)
    at.button(key="spectra_go").click().run()
    assert not at.exception, at.exception
    assert [s.label.startswith("Calibrating on 16 examples") for s in at.status] == [True]
    assert traces(at) == ["L1 weight"] * 2 + ["L1 activation-aware"] * 2
    at.selectbox(key="spectra_module").set_value("q_proj").run()  # same layer: Grams in memory, no new click
    assert not at.status and not [b for b in at.button if b.key == "spectra_go"]
    assert traces(at) == ["L1 weight"] * 2 + ["L1 activation-aware"] * 2
    fresh = started("pages/spectra.py")  # another session: the spectrum from the disk cache, no button
    assert not fresh.status and traces(fresh) == ["L1 weight"] * 2 + ["L1 activation-aware"] * 2
    assert not [b for b in fresh.button if b.key == "spectra_go"]


def test_the_heatmap_is_not_computed_before_its_click():
    at = started("pages/spectra.py")
    assert "heat_chart" not in plotly_specs(at)
    at.radio(key="heat_basis").set_value("activation-aware").run()
    assert not at.status and "heat_chart" not in plotly_specs(at)


def test_choices_survive_leaving_the_page_and_coming_back():
    at = started("pages/spectra.py")
    at.selectbox(key="spectra_module").set_value("up_proj")
    at.multiselect(key="spectra_layers").set_value([0, 1])
    at.toggle(key="spectra_aware").set_value(False)
    at.number_input(key="spectra_rank").set_value(5)
    at.slider(key="heat_energy").set_value(0.95)
    at.radio(key="heat_basis").set_value("activation-aware")
    at.run()
    assert not at.exception, at.exception
    at.switch_page("pages/budget.py").run()
    assert at.title[0].value == "Budget"
    at.switch_page("pages/spectra.py").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="spectra_module").value == "up_proj"
    assert at.multiselect(key="spectra_layers").value == [0, 1]
    assert at.toggle(key="spectra_aware").value is False
    assert at.number_input(key="spectra_rank").value == 5
    assert at.slider(key="heat_energy").value == 0.95
    assert at.radio(key="heat_basis").value == "activation-aware"
    assert traces(at) == ["L0 weight", "L0 weight", "L1 weight", "L1 weight"]


def test_the_activation_aware_toggle_has_a_short_label_a_help_and_room():
    at = started("pages/spectra.py")
    toggle = at.toggle(key="spectra_aware")
    assert toggle.label == "Activation-aware" and "calibration" in toggle.help
    holder = next(c for c in at.get("column") if [e.key for e in c.children.values()] == ["spectra_aware"])
    assert holder.proto.weight >= 0.4  # 3 of 7 of the row's width, alone in its column


def heatmap(at):
    """Compute the heatmap; its figure data."""
    at.button(key="heat_go").click().run()
    assert not at.exception, at.exception
    return plotly_specs(at)["heat_chart"]["data"][0]


def test_heatmap_ranks_become_a_plan_on_the_budget_page():
    at = started("pages/spectra.py")
    at.slider(key="heat_energy").set_value(0.95).run()
    heat = heatmap(at)
    at.button(key="heat_plan").click().run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Budget"
    stored = at.session_state["lowrank_plan"]
    assert stored["source"] == "Budget page"  # the Budget page took the plan over and stores its own copy
    lm = load_model("tiny", device="cpu")
    linears = linear_map(lm.model)
    shown = at.data_editor[0].value.to_dict("records")
    resolved = resolve_plan(plan_from_rows(shown), linears)
    by_cell = {(li.layer, li.module): resolved[li.name].rank for li in linears if li.name in resolved}
    modules = heat["x"]
    expected = {(layer, m): heat["z"][layer][j] for layer in range(2) for j, m in enumerate(modules)}
    assert by_cell == expected  # every decoder matrix at the heatmap's rank
    assert {r["method"] for r in shown} == {"svd"}  # the weight energy measures the plain SVD's error
    assert "matrices have a rank above break-even" in texts(at.warning)  # tiny random weights: flat spectra


def test_the_stored_plan_names_its_energy_and_basis_and_can_keep_only_saving_matrices(monkeypatch):
    at = started("pages/spectra.py")
    heatmap(at)
    at.checkbox(key="heat_saving_only").check().run()
    at.button(key="heat_plan").click().run()
    assert at.title[0].value == "Spectra"  # nothing saves parameters on tiny at 90%: an error, no switch
    assert "below its break-even rank" in texts(at.error)
    lm = load_model("tiny", device="cpu")
    decoder = [li for li in linear_map(lm.model) if li.layer is not None]
    rows = energy_rank_table(model_spectra(lm.model, decoder, cache=False), 0.9)
    assert not any(r["saves"] for r in rows)
    sources = []
    original = state.store_plan
    monkeypatch.setattr(state, "store_plan", lambda plan, source: sources.append(source) or original(plan, source))
    at.checkbox(key="heat_saving_only").uncheck().run()
    at.slider(key="heat_energy").set_value(0.95).run()
    at.button(key="heat_plan").click().run()
    assert sources[:2] == ["Spectra: 95% weight energy", "Budget page"]  # then the Budget page took it over


def test_spectrum_figure_log_axis_shows_decades_and_ranks_start_at_one():
    fig = spectrum_figure({"L1 weight": [1.0, 0.3, 0.01, 0.002]}, {"L1 weight": [0.9, 0.99, 1.0, 1.0]}, 2, 3, "t")
    layout = fig.to_plotly_json()["layout"]
    assert layout["yaxis"]["type"] == "log" and layout["yaxis"]["dtick"] == 1
    assert layout["yaxis"]["exponentformat"] == "power"
    assert layout["xaxis"]["range"] == [1, 4] and layout["xaxis2"]["range"] == [1, 4]
    for axis in ("xaxis", "xaxis2", "yaxis", "yaxis2"):
        assert layout[axis]["title"]["text"], axis


def test_the_page_draws_the_spectrum_with_decade_ticks():
    at = started("pages/spectra.py")
    layout = plotly_specs(at)["spectra_chart"]["layout"]
    assert layout["yaxis"]["dtick"] == 1 and layout["xaxis"]["range"][0] == 1


def test_plan_for_energy_groups_layers_and_picks_the_method_of_the_basis():
    lm = load_model("tiny", device="cpu")
    decoder = [li for li in linear_map(lm.model) if li.layer is not None]
    flat = np.ones(64)
    steep = np.array([10.0] + [0.01] * 63)
    spectra = [Spectrum(li.name, flat, steep, li.break_even_rank, li.max_rank, li.layer, li.module)
               for li in decoder if li.module == "up_proj"]
    aware = plan_for_energy(spectra, 0.9, "aware", decoder)
    assert [(r.layers, r.modules, r.rank, r.method) for r in aware.rules] == [("0-1", ["up_proj"], 1, "whitened")]
    weight = plan_for_energy(spectra, 0.9, "weight", decoder)
    assert [(r.layers, r.rank, r.method) for r in weight.rules] == [("0-1", 58, "svd")]
    with pytest.raises(ValueError, match="break-even"):
        plan_for_energy(spectra, 0.9, "weight", decoder, saving_only=True)
    assert plan_for_energy(spectra, 0.9, "aware", decoder, saving_only=True).rules == aware.rules
