"""Two callers on one teacher: a compression (hooks, taps) running while another caller scores the same model
gets exactly the results of solo runs, and leaves no hook behind."""
from __future__ import annotations

import threading

import pytest
import torch

from lowrank_core.compare import CompareSettings, compare
from lowrank_core.compress import CompressSettings, compress
from lowrank_core.data import make_split
from lowrank_core.evaluate import evaluate_models
from lowrank_core.methods.refit import RefitSettings
from lowrank_core.models import tiny_model

JOBS = [("all:k0.5", CompressSettings(calib=8, max_len=64, method="whitened")),
        ("all:k0.5", CompressSettings(calib=8, max_len=64, method="anchored")),
        ("mlp:k0.5", CompressSettings(calib=8, max_len=64, method="refit",
                                     method_settings={"refit": RefitSettings(steps=2)}))]


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _factors(result) -> dict:
    return {k: v.clone() for k, v in result.student.state_dict().items() if k.endswith((".down.weight", ".up.weight"))}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, tok = tiny_model("llama")
    split = make_split("chatterbot", n_calib=8, n_eval=12, seed=0)
    return model, tok, split


def test_compression_beside_evaluation_equals_solo_runs(setup):
    model, tok, split = setup
    solo_eval = evaluate_models({"teacher": model}, tok, split.eval, batch_size=3, max_len=64)["teacher"].loss
    solo_factors = [_factors(compress(model, tok, plan, split.calib, s)) for plan, s in JOBS]
    errors, losses, factors = [], [], []
    running = threading.Event()

    def compressing():
        try:
            for _ in range(3):
                for plan, s in JOBS:
                    factors.append(_factors(compress(model, tok, plan, split.calib, s)))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            running.set()

    worker = threading.Thread(target=compressing)
    worker.start()
    while not running.is_set():
        try:
            losses.append(evaluate_models({"teacher": model}, tok, split.eval, batch_size=3, max_len=64)["teacher"].loss)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            break
    worker.join()
    assert not errors, errors
    assert len(losses) >= 2 and all(loss == solo_eval for loss in losses), (solo_eval, losses)
    assert len(factors) == 3 * len(JOBS)
    for i, got in enumerate(factors):
        want = solo_factors[i % len(JOBS)]
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), JOBS[i % len(JOBS)]
    assert _hooks(model) == 0


def test_compare_beside_compression_equals_solo(setup):
    model, tok, split = setup
    student = compress(model, tok, "all:k0.5", split.calib, JOBS[0][1]).student
    settings = CompareSettings(examples=12, batch_size=2, max_len=64, bootstrap=100)
    solo = compare(model, student, tok, split.eval, settings).summary()
    done, errors = threading.Event(), []

    def compressing():
        try:
            while not done.is_set():
                compress(model, tok, "all:k0.5", split.calib, JOBS[0][1])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    worker = threading.Thread(target=compressing)
    worker.start()
    try:
        runs = [compare(model, student, tok, split.eval, settings).summary() for _ in range(4)]
    finally:
        done.set()
        worker.join()
    assert not errors, errors
    for r in runs:
        assert (r["teacher_loss"], r["student_loss"], r["kl"]) == (solo["teacher_loss"], solo["student_loss"], solo["kl"])


def _memo_then_forget(cache):
    """``cache.memo`` that does not keep teacher scores: this test's sessions score the teacher for real and
    other tests' sessions must too."""
    real = cache.memo

    def memo(kind, key, compute, max_entries=8):
        value = real(kind, key, compute, max_entries)
        if kind == "teacher_eval":
            cache.forget(kind)
        return value

    return memo


def test_two_app_sessions_on_one_teacher(monkeypatch, tmp_path):
    """Two real AppTest sessions share the process-wide teacher: while one compresses in the background
    (Gram hooks live, slowed down so the two overlap), the other scores the teacher; both get solo results."""
    import threading

    from streamlit.testing.v1 import AppTest

    from lowrank_core import calibrate
    from lowrank_core.evaluate import evaluate

    from test_app import APP, _run_entrypoint_every_time, metrics

    from lowrank_core.models import load_model

    _run_entrypoint_every_time(monkeypatch)
    for name, value in (("LOWRANK_APP_MODEL", "tiny"), ("LOWRANK_APP_DATA", "chatterbot"),
                        ("LOWRANK_CACHE", str(tmp_path / "cache")), ("LOWRANK_WORKSPACE", str(tmp_path / "ws"))):
        monkeypatch.setenv(name, value)
    real_add = calibrate.GramAccumulator.add
    scored = threading.Event()  # set once session b's teacher score is in: a's Gram pass waits for it

    def slow_add(self, *args, **kwargs):
        scored.wait(300)  # a's compression (hooks live) cannot finish before b has scored, however slow b is
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(calibrate.GramAccumulator, "add", slow_add)
    split = make_split("chatterbot", n_calib=16, n_eval=32, seed=0)
    lm = load_model("tiny", device="cpu")
    model, tok = lm.model, lm.tokenizer
    solo_loss = evaluate(model, tok, split.eval, max_len=128).loss

    from ui import cache

    cache.forget("teacher_eval")  # session b must really score the teacher (earlier tests may have cached it)
    monkeypatch.setattr(cache, "memo", _memo_then_forget(cache))  # and leaves no teacher score to later tests
    a = AppTest.from_file(APP, default_timeout=120)
    a.run()
    a.switch_page("pages/compress.py").run()
    a.text_area(key="compress_plan").set_value("all:k0.5")
    a.form_submit_button[0].click().run()
    job = a.session_state["lowrank_pending_job"]
    b = AppTest.from_file(APP, default_timeout=120)
    b.run()
    b.button(key="score_teacher").click().run()
    assert not b.exception, b.exception
    # the click started the teacher's background job: wait for it and draw the result
    assert b.session_state["lowrank_pending_teacher"].wait(120)
    overlapped = not job.finished  # b's whole scoring ran while a's compression (and its hooks) was live
    scored.set()
    b.run()
    assert metrics(b)["teacher answer loss"] == f"{solo_loss:.4f}"
    assert job.wait(120) and job.error is None, job.error
    assert overlapped  # the teacher was scored while the other session's hooks were live
    solo = compress(model, tok, "all:k0.5", split.calib, CompressSettings(calib=16, max_len=128, seed=0)).student
    got = job.result.student.state_dict()
    for k, v in solo.state_dict().items():
        assert torch.equal(got[k], v), k
    assert "lowrank_pending_job" not in b.session_state and "lowrank_runs" not in b.session_state
