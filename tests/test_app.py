"""AppTest checks of every page on the tiny random model and the chatterbot corpus."""
from __future__ import annotations

from pathlib import Path

import pytest

from lowrank_core import stats

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")
MISTRAL_CONFIG = Path(__file__).resolve().parent / "fixtures" / "mistral-7b-openorca-config.json"
QWEN3_CONFIG = MISTRAL_CONFIG.with_name("qwen3-8b-config.json")
SEED_NUMBERS = (7_241_748_480, 173_867_040, 6_162_305_024, 4_935_372_800, 7_066_472_448)


@pytest.fixture(autouse=True)
def tiny_env(monkeypatch, tmp_path):
    _run_entrypoint_every_time(monkeypatch)
    monkeypatch.setenv("LOWRANK_APP_MODEL", "tiny")
    monkeypatch.setenv("LOWRANK_APP_DATA", "chatterbot")
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LOWRANK_WORKSPACE", str(tmp_path / "workspace"))  # where typed paths may point


def _run_entrypoint_every_time(monkeypatch) -> None:
    """AppTest resets Streamlit's legacy "pages/ folder" mode before every run, so its reruns would execute
    the page file alone and ``ui.entry.ensure_app`` would rerun each of them, eating button clicks. A real
    server leaves that mode for good once ``st.navigation`` ran; mirror that, so every run executes
    ``app.py``. (The deep-link case itself is covered by tests/test_browser.py.)"""
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
    assert "calib **16** · val **0** · eval **32**" in side


def scored_teacher(at: AppTest) -> AppTest:
    """Click "Score the teacher", wait for its background job and draw the finished page."""
    at.button(key="score_teacher").click().run()
    assert not at.exception, at.exception
    job = at.session_state["lowrank_pending_teacher"]
    assert job.wait(120) and job.error is None, job.error
    at.run()
    assert not at.exception, at.exception
    return at


def test_model_page_scores_teacher_like_the_engine():
    from lowrank_core.data import make_split
    from lowrank_core.evaluate import evaluate
    from lowrank_core.models import load_model

    at = started()
    scored_teacher(at)
    lm = load_model("tiny", device="cpu")
    split = make_split("chatterbot", n_calib=16, n_eval=32, n_val=0, seed=0)
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
    at.text_input(key="model_text").set_value("nonexistent/model").run()
    at.button(key="apply_settings").click().run()
    assert not at.exception, at.exception
    assert "nonexistent/model" in texts(at.error) and "not found" in texts(at.error)
    assert "Not applied" in texts(at.error)  # refused before applying: the last good model stays
    assert at.session_state["lowrank_settings"].model_source == "tiny"
    assert metrics(at)["linears"] == "15" and "90,624 parameters" in texts(at.sidebar.markdown)


@pytest.mark.parametrize("config,linears,mlp", [(MISTRAL_CONFIG, "225", 32 * 3 * 14336 * 4096),
                                                 (QWEN3_CONFIG, "253", 36 * 3 * 12288 * 4096)])
def test_model_page_maps_a_config_only_source(config, linears, mlp):
    import shutil

    from lowrank_core.workspace import workspace_dir

    shutil.copy(config, workspace_dir() / "config-only.json")
    at = started()
    at.selectbox(key="model_kind").set_value("Local folder, config.json or .gguf").run()
    at.text_input(key="model_text").set_value("config-only.json").run()
    at.button(key="apply_settings").click().run()
    assert not at.exception, at.exception
    assert "holds a config only" in texts(at.error)
    assert metrics(at)["linears"] == linears  # layers x 7 + untied lm_head
    assert metrics(at)["mlp weights"] == f"{mlp:,}"


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


def test_budget_plan_save_failure_keeps_the_plan_and_says_where(monkeypatch, tmp_path):
    from test_rescue import failing_once

    from lowrank_core.plan import Plan, load_plan
    from lowrank_core.workspace import workspace_dir

    monkeypatch.setattr(Plan, "save", failing_once(Plan.save, OSError(28, "No space left on device")))
    at = started("pages/budget.py")
    (workspace_dir() / "plans").mkdir(parents=True, exist_ok=True)
    at.button(key="budget_save").click().run()
    assert not at.exception, at.exception
    kept = next((tmp_path / "cache" / "rescued").iterdir())
    error = texts(at.error)
    assert f"writing the plan to {workspace_dir() / 'plans' / 'plan.yaml'} failed" in error
    assert f"saved to {kept} instead" in error and not (workspace_dir() / "plans" / "plan.yaml").exists()
    assert load_plan(str(kept)).to_dict() == at.session_state["lowrank_plan"]["plan"].to_dict()


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


# ----------------------------------------------------------------------------- compress / evaluate / export
def plotly_specs(at: AppTest) -> dict[str, dict]:
    """{chart key suffix: figure dict} of the plotly charts on the page."""
    import json

    return {c.proto.id.rsplit("-", 1)[-1]: json.loads(c.proto.spec) for c in at.get("plotly_chart")}


def compressed(plan: str = "mlp:r8", method: str = "whitened", **form) -> AppTest:
    at = started("pages/compress.py")
    at.text_area(key="compress_plan").set_value(plan)
    at.selectbox(key="compress_method").set_value(method)
    for key, value in form.items():
        at.number_input(key=key).set_value(value)
    at.form_submit_button[0].click().run()
    assert not at.exception, at.exception
    return finish_job(at)


def finish_job(at: AppTest) -> AppTest:
    """Wait for the background compression the last run started (if any), then rerun the page."""
    if "lowrank_pending_job" in at.session_state:
        assert at.session_state["lowrank_pending_job"].wait(120)
        at.run()
        assert not at.exception, at.exception
    return at


def test_compress_builds_the_student_and_reuses_a_finished_job():
    at = compressed("mlp:r8")
    assert not at.error, texts(at.error)
    # 2 layers x (gate 128x64, up 128x64, down 64x128) replaced by rank-8 factors: 6 x 8 x 192 parameters
    assert metrics(at)["parameters after"] == f"{90_624 - 6 * 128 * 64 + 6 * 8 * 192:,}"
    bars = plotly_specs(at)["compress_errors"]["data"]
    assert sorted(len(b["x"]) for b in bars) == [2, 2, 2]  # one bar per replaced matrix, by module
    assert len(at.session_state["lowrank_runs"]) == 1
    at.form_submit_button[0].click().run()
    assert "nothing was recomputed" in texts(at.success)
    assert len(at.session_state["lowrank_runs"]) == 1
    assert at.text_area(key="compress_plan").value == "mlp:r8"  # the form keeps what was submitted


def held_after(monkeypatch, module, name: str, after: int):
    """``module.<name>`` runs ``after`` calls, then waits (up to 600 s: a slow machine only waits longer) on the
    returned gate; ``calls`` counts them and ``reached`` is set once a call waits. Returns (gate, calls, reached)."""
    import threading

    gate, reached, calls, real = threading.Event(), threading.Event(), [], getattr(module, name)

    def held(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            reached.set()
            gate.wait(600)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, held)
    return gate, calls, reached


def hold_back(monkeypatch, module, name: str):
    """Make ``module.<name>`` wait (up to 600 s: a slow machine only waits longer) for the returned event: a
    job that stays running."""
    import threading

    release = threading.Event()
    real = getattr(module, name)

    def held_back(*args, **kwargs):
        release.wait(600)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, held_back)
    return release


def test_compress_job_runs_in_the_background_with_the_form_disabled(monkeypatch):
    import lowrank_core.compress

    release = hold_back(monkeypatch, lowrank_core.compress, "compress")
    at = started("pages/compress.py")
    at.text_area(key="compress_plan").set_value("mlp:r8")
    at.form_submit_button[0].click().run()
    assert not at.exception, at.exception
    assert at.text_area(key="compress_plan_busy").disabled and at.text_area(key="compress_plan_busy").value == "mlp:r8"
    assert at.selectbox(key="compress_method_busy").disabled
    assert at.form_submit_button[0].disabled
    assert "Compressing tiny (whitened)" in at.status[0].label
    at.switch_page("pages/budget.py").run()  # leaving the page neither stops nor restarts the job
    job = at.session_state["lowrank_pending_job"]
    release.set()
    assert job.wait(60)
    at.switch_page("pages/compress.py").run()
    assert not at.exception, at.exception
    assert metrics(at)["parameters after"] == f"{90_624 - 6 * 128 * 64 + 6 * 8 * 192:,}"
    assert not at.form_submit_button[0].disabled
    assert len(at.session_state["lowrank_runs"]) == 1


def test_compress_stop_cancels_the_job_and_keeps_nothing(monkeypatch):
    import lowrank_core.job

    release = hold_back(monkeypatch, lowrank_core.job, "compress")  # the job's own name for it
    at = started("pages/compress.py")
    at.text_area(key="compress_plan").set_value("mlp:r8")
    at.form_submit_button[0].click().run()
    assert not at.exception, at.exception
    job = at.session_state["lowrank_pending_job"]
    at.button(key="compress_stop").click().run()
    assert job.stop_requested
    release.set()
    assert job.wait(60) and job.cancelled, (job.error, job.result)
    at.run()
    assert not at.exception, at.exception
    assert "Compression stopped on request: nothing was kept." in texts(at.warning) and not texts(at.error)
    assert "lowrank_runs" not in at.session_state or at.session_state["lowrank_runs"] == []
    assert not at.form_submit_button[0].disabled


def test_compress_bad_plan_is_an_error_and_runs_nothing():
    at = compressed("mlp:r999")
    assert "exceeds min(out, in)" in texts(at.error)
    assert "lowrank_runs" not in at.session_state or at.session_state["lowrank_runs"] == []
    assert not at.get("plotly_chart")


def test_compress_refit_shows_train_and_valid_curves():
    at = compressed("1:mlp:r8", "refit", refit_steps=4)
    assert not at.error, texts(at.error)
    assert "Refit curves" in texts(at.subheader)
    curve = plotly_specs(at)["compress_refit"]["data"]
    assert [t["name"] for t in curve] == ["train", "valid"] and curve[0]["y"]


def test_compress_heals_and_draws_the_healing_curve():
    at = compressed("all:k0.3", "whitened", heal_tokens=1500, heal_batch_tokens=256)
    assert not at.error, texts(at.error)
    assert "Healing" in texts(at.subheader)
    job = at.session_state["lowrank_results"][at.session_state["lowrank_current_job"]]
    assert job.healed is not None and job.healed.tokens >= 1 and job.spec.heal.tokens == 1500
    curve = plotly_specs(at)["compress_heal"]["data"]
    assert [t["name"] for t in curve] == ["train", "valid"] and len(curve[0]["y"]) == job.healed.steps


def test_compress_draws_the_live_healing_curve_from_the_progress_metrics(monkeypatch):
    import threading

    import lowrank_core.heal as heal_mod

    gate, calls, _ = held_after(monkeypatch, heal_mod, "batch_loss", 12)  # healing pauses: the job still runs
    at = started("pages/compress.py")
    at.text_area(key="compress_plan").set_value("all:k0.3")
    at.number_input(key="heal_tokens").set_value(5000)
    at.number_input(key="heal_batch_tokens").set_value(64)
    at.form_submit_button[0].click().run()
    job = at.session_state["lowrank_pending_job"]
    try:
        for _ in range(600):
            if len(calls) > 12 and job.heal_curve:
                break
            threading.Event().wait(0.05)
        at.run()
        assert not at.exception, at.exception
        tokens, train, valid = (list(v) for v in zip(*job.heal_curve))
        live = {t["name"]: t for t in plotly_specs(at)["compress_heal_live"]["data"]}
        assert live["train (last step)"]["y"] == train and live["valid (last check)"]["y"] == valid
        assert live["train (last step)"]["x"] == tokens and not job.finished
        assert [m["train_loss"] for _, m in job.series("heal")] == train  # typed metrics, no message read
    finally:
        job.request_stop()  # the rest of the healing is not needed: the stop ends it at its next report
        gate.set()
    assert job.wait(120) and job.cancelled


def evaluated(plan: str = "mlp:r8") -> AppTest:
    at = compressed(plan)
    at.switch_page("pages/evaluate.py").run()
    at.button(key="eval_go").click().run()
    assert not at.exception, at.exception
    assert at.session_state["lowrank_pending_compare"].wait(120)
    at.run()
    assert not at.exception, at.exception
    return at


def test_evaluate_compares_teacher_and_student_like_the_engine():
    from lowrank_core.compare import CompareSettings, compare
    from lowrank_core.compress import CompressSettings, compress
    from lowrank_core.data import make_split
    from lowrank_core.evaluate import evaluate_models
    from lowrank_core.models import load_model
    from lowrank_core.methods.refit import RefitSettings

    at = evaluated()
    lm = load_model("tiny", device="cpu")
    split = make_split("chatterbot", n_calib=16, n_eval=32, seed=0)
    student = compress(lm.model, lm.tokenizer, "mlp:r8", split.calib,
                       CompressSettings(calib=16, max_len=128,
                                        method_settings={"refit": RefitSettings(seed=0)})).student
    expected = evaluate_models({"teacher": lm.model, "student": student}, lm.tokenizer, split.eval, max_len=128)
    # the page stops when decided by default: the engine's until-decided pass at the same maximum
    engine = compare(lm.model, student, lm.tokenizer, split.eval,
                     CompareSettings(examples=32, max_len=128, until_decided=True)).summary()
    shown = metrics(at)
    if engine["stopping_n"] == 32:
        assert shown["Δ loss (student − teacher)"] == f"{expected['student'].loss - expected['teacher'].loss:+.4f}"
    assert shown["Δ loss (student − teacher)"] == f"{engine['delta']:+.4f}"
    assert shown["95% interval"] == stats.interval_text(engine["delta_ci"])
    assert f"Procedure: {engine['procedure']}" in texts(at.caption)
    assert {"eval_path"} <= set(plotly_specs(at))
    assert shown["top-1 agreement"] == f"{engine['top1_agreement']:.1%}"
    verdict = texts(at.success) + texts(at.error) + texts(at.warning)
    assert engine["verdict_text"] in verdict
    assert {"eval_hist", "eval_scatter", "eval_path"} <= set(plotly_specs(at))
    worst = at.dataframe[0].value
    assert len(worst) == 10 and worst["delta"].is_monotonic_decreasing
    runs = at.dataframe[-1].value
    assert runs.loc[0, "student_loss"] == pytest.approx(engine["student_loss"], abs=1e-6)
    assert runs.loc[0, "verdict"] == engine["verdict"] and runs.loc[0, "eval_examples"] == engine["examples"]
    assert list(runs.columns[:8]) == ["run", "time", "plan", "method", "of_original", "eval_examples",
                                      "teacher_loss", "student_loss"]
    for key in ("eval_json", "eval_csv", "runs_csv"):
        assert at.download_button(key=key)
    job = at.session_state["lowrank_results"][at.session_state["lowrank_current_job"]]
    assert job.comparison_summary()["delta"] == pytest.approx(engine["delta"], abs=1e-9)  # the export carries it


def test_evaluate_margin_rejudges_without_rescoring_and_bad_margin_is_an_error():
    at = evaluated()
    before = at.session_state["lowrank_comparisons"]
    at.text_input(key="eval_margin").set_value("1000%").run()
    assert "Equivalent" in texts(at.success)
    assert at.session_state["lowrank_comparisons"] is before and "lowrank_pending_compare" not in at.session_state
    at.text_input(key="eval_margin").set_value("lots").run()
    assert "bad margin 'lots'" in texts(at.error)
    assert "eval_hist" not in plotly_specs(at) and not [b for b in at.button if b.key == "eval_go"]


def test_evaluate_shows_answers_side_by_side():
    at = evaluated()
    at.number_input(key="answers_k").set_value(2)
    at.number_input(key="answers_tokens").set_value(6).run()
    at.button(key="answers_go").click().run()
    assert not at.exception, at.exception
    captions = texts(at.caption)
    assert captions.count("teacher · ") == 4 and captions.count("student · ") == 4  # 2 prompts x greedy, sampled
    assert "greedy" in texts(at.markdown) and "sampled" in texts(at.markdown)


def test_evaluate_live_chart_shows_the_boundary_of_the_next_look(monkeypatch):
    import lowrank_core.compare as compare_mod

    gate, calls, reached = held_after(monkeypatch, compare_mod, "score_batch", 4)
    at = compressed("mlp:r8")
    at.switch_page("pages/evaluate.py").run()
    assert at.checkbox(key="eval_until_decided").value  # stop when decided: the page's default
    at.button(key="eval_go").click().run()
    job = at.session_state["lowrank_pending_compare"]
    try:
        assert reached.wait(120)
        at.run()
        assert not at.exception, at.exception
        live: dict = {}
        for trace in plotly_specs(at)["eval_live"]["data"]:
            live.setdefault(trace.get("name"), trace)  # + boundary first, then its − mirror
        series = job.series("compare")
        within = [m["equivalent_within"] for _, m in series if "equivalent_within" in m]
        assert within and live["equivalent if |Δ| inside"]["y"] == within  # the engine's boundary, drawn
        assert live["Δloss so far"]["y"] == [m["delta"] for _, m in series]
        first = stats.planned_looks(32)[0]  # 32 examples: the first planned look (none before MIN_INTERVAL_N)
        assert all(m["look_examples"] == first for _, m in series if "look_examples" in m)
        assert "95% interval" not in live  # 4 examples: no interval shown yet
    finally:
        job.request_stop()
        gate.set()
    assert job.wait(60)


def test_evaluate_stop_keeps_the_examples_scored(monkeypatch):
    import lowrank_core.compare as compare_mod

    gate, calls, _ = held_after(monkeypatch, compare_mod, "score_batch", 3)
    at = compressed("mlp:r8")
    at.switch_page("pages/evaluate.py").run()
    at.button(key="eval_go").click().run()
    job = at.session_state["lowrank_pending_compare"]
    job.request_stop()
    gate.set()
    assert job.wait(60)
    at.run()
    assert not at.exception, at.exception
    (comparison,) = at.session_state["lowrank_comparisons"].values()
    assert comparison.stopped and 1 <= comparison.examples < 32
    assert "stopped early" in texts(at.success) + texts(at.error) + texts(at.warning)


def test_export_writes_a_verified_folder_and_refuses_to_overwrite():
    import json

    from lowrank_core.workspace import workspace_dir

    at = compressed("mlp:r8")
    at.switch_page("pages/export.py").run()
    at.radio(key="export_format").set_value("factorized").run()
    target = workspace_dir() / "student"
    at.text_input[0].set_value("student")  # relative to the workspace
    at.button(key="export_go").click().run()
    assert not at.exception, at.exception
    assert "Verified" in texts(at.success), texts(at.error)
    manifest = json.loads((target / "lowrank.json").read_text())
    assert manifest["format"] == "factorized"
    assert manifest["plan"] == {"rules": [{"layers": "all", "modules": ["mlp"], "rank": 8}]}
    assert metrics(at)["parameters stored"] == f"{90_624 - 6 * 128 * 64 + 6 * 8 * 192:,}"
    at.button(key="export_go").click().run()
    assert "already exists" in texts(at.error)


def test_export_failure_is_one_line_naming_the_target_and_the_rescue(monkeypatch, tmp_path):
    import safetensors.torch
    from safetensors import SafetensorError
    from test_rescue import failing_once

    from lowrank_core.workspace import workspace_dir

    at = compressed("mlp:r8")
    at.switch_page("pages/export.py").run()
    full_disk = SafetensorError("Error while serializing: I/O error: No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", failing_once(safetensors.torch.save_file, full_disk))
    at.text_input[0].set_value("student")
    at.button(key="export_go").click().run()
    assert not at.exception, at.exception
    kept = next((tmp_path / "cache" / "rescued").iterdir())
    error = texts(at.error)
    assert f"writing the dense export to {workspace_dir() / 'student'} failed (Error while serializing" in error
    assert f"saved unverified to {kept} instead" in error and "\n" not in error.strip()
    assert not (workspace_dir() / "student").exists() and (kept / "lowrank.json").is_file()


def test_pages_say_what_to_do_before_any_compression():
    for page in ("pages/evaluate.py", "pages/export.py"):
        at = started(page)
        assert "Compress a model on the **Compress** page first" in texts(at.info)
        assert "90,624 parameters" in texts(at.sidebar.markdown)  # a page that ends early keeps the sidebar


# ----------------------------------------------------------------------------- spectra
def test_spectra_page_plots_both_spectra_and_caches_them_on_disk():
    from lowrank_core.linears import linear_map
    from lowrank_core.calibrate import collect_grams
    from lowrank_core.data import calibration_batches
    from lowrank_core.data import make_split
    from lowrank_core.models import load_model
    from lowrank_core.spectra import compute_spectrum

    at = started("pages/spectra.py")
    assert not at.error, texts(at.error)
    assert not at.status  # nothing calibrates before the click
    at.button(key="spectra_go").click().run()
    assert [s.label.startswith("Calibrating on 16 examples") for s in at.status] == [True]
    traces = [t["name"] for t in plotly_specs(at)["spectra_chart"]["data"]]
    # tiny has 2 layers (default layer 1); each spectrum has a singular-value and a cumulative-energy trace
    assert traces == ["L1 weight"] * 2 + ["L1 activation-aware"] * 2
    table = at.dataframe[0].value.set_index("spectrum")
    lm = load_model("tiny", device="cpu")
    info = next(li for li in linear_map(lm.model) if li.name == "model.layers.1.mlp.down_proj")
    split = make_split("chatterbot", n_calib=16, n_eval=32, seed=0)
    grams = collect_grams(lm.model, calibration_batches(lm.tokenizer, split.calib, 4, 128), [info])
    expected = compute_spectrum(lm.model, info, grams[info.gram_key].gram)
    for kind in ("weight", "aware"):
        assert table.loc[kind, "rank for 90%"] == expected.rank_for_energy(0.9, kind)
        assert table.loc[kind, "energy kept at rank"] == pytest.approx(expected.energy(kind)[15])
    again = started("pages/spectra.py")  # a new session: the spectrum comes from the disk cache
    assert not again.status
    assert again.dataframe[0].value.equals(at.dataframe[0].value)


def test_spectra_heatmap_shows_the_rank_for_the_chosen_energy():
    from lowrank_core.linears import linear_map
    from lowrank_core.models import load_model
    from lowrank_core.spectra import compute_spectrum

    at = started("pages/spectra.py")
    at.slider(key="heat_energy").set_value(0.95).run()
    at.button(key="heat_go").click().run()
    assert not at.exception, at.exception
    heat = plotly_specs(at)["heat_chart"]["data"][0]
    assert heat["x"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lm = load_model("tiny", device="cpu")
    info = next(li for li in linear_map(lm.model) if li.name == "model.layers.0.self_attn.k_proj")
    assert heat["z"][0][1] == compute_spectrum(lm.model, info).rank_for_energy(0.95, "weight")


def test_runs_of_another_model_are_not_offered_as_its_students():
    from dataclasses import replace

    at = compressed("mlp:r8")
    at.session_state["lowrank_settings"] = replace(at.session_state["lowrank_settings"], model_source="tiny-mistral")
    at.switch_page("pages/evaluate.py").run()
    assert not at.exception, at.exception
    assert "Compress a model on the **Compress** page first" in texts(at.info)
    assert len(at.dataframe[-1].value) == 1  # the run stays in the session's runs table


def test_every_page_on_phi3_plans_fused_linears_by_parts(monkeypatch):
    """tiny-phi3 (fused qkv_proj / gate_up_proj): the map, Budget and Spectra render, Compress builds a plan on
    the parts with the engine's exact count, Evaluate scores it and Export writes a verified factorized folder."""
    from lowrank_core.models import load_config
    from lowrank_core.plan import account

    monkeypatch.setenv("LOWRANK_APP_MODEL", "tiny-phi3")
    at = started()
    assert metrics(at)["linears"] == "9"  # 2 layers x (qkv_proj, o_proj, gate_up_proj, down_proj) + lm_head
    at.session_state["spectra_aware"] = False
    for page in ("pages/budget.py", "pages/spectra.py"):
        at.switch_page(page).run()
        assert not at.exception, (page, at.exception)
        assert not at.error, (page, texts(at.error))
    plan = "q_proj:r4; k_proj:r2; 1:up_proj:r6"
    at.switch_page("pages/compress.py").run()
    at.text_area(key="compress_plan").set_value(plan)
    at.form_submit_button[0].click().run()
    at = finish_job(at)
    assert not at.error, texts(at.error)
    assert metrics(at)["parameters after"] == f"{account(load_config('tiny-phi3'), plan).compressed:,}"
    at.switch_page("pages/evaluate.py").run()
    at.button(key="eval_go").click().run()
    assert at.session_state["lowrank_pending_compare"].wait(120)
    at.run()
    assert not at.exception, at.exception
    assert "Δ loss (student − teacher)" in metrics(at)
    at.switch_page("pages/export.py").run()
    at.radio(key="export_format").set_value("factorized").run()
    at.text_input[0].set_value("phi3-student")
    at.button(key="export_go").click().run()
    assert not at.exception, at.exception
    assert "Verified" in texts(at.success), texts(at.error)


@pytest.mark.integration
def test_every_page_renders_on_the_embedded_default(monkeypatch):
    """The embedded SmolLM2-135M with ShareGPT: each page renders without error (no heavy button pressed;
    the activation-aware spectrum is switched off so no calibration pass runs)."""
    monkeypatch.setenv("LOWRANK_APP_MODEL", "default")
    monkeypatch.setenv("LOWRANK_APP_DATA", "default")
    at = started()
    assert metrics(at)["linears"] == "211"  # 30 layers x 7 + tied lm_head
    assert "SmolLM2-135M-Instruct" in texts(at.sidebar.markdown)
    at.session_state["spectra_aware"] = False
    for page in ("pages/budget.py", "pages/spectra.py", "pages/compress.py", "pages/evaluate.py", "pages/export.py"):
        at.switch_page(page).run()
        assert not at.exception, (page, at.exception)
        assert not at.error, (page, texts(at.error))
    at.switch_page("pages/spectra.py").run()
    assert [t["name"] for t in plotly_specs(at)["spectra_chart"]["data"]] == ["L17 weight"] * 2
