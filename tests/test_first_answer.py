"""The first answer fast: the teacher's loss streams in with its interval, a stop keeps the partial
estimate, a complete run equals the engine's ``evaluate`` (engine and Model & data page)."""
from __future__ import annotations

import math
import threading

import pytest

from test_app import metrics, scored_teacher, started, texts, tiny_env  # noqa: F401  (tiny_env: autouse)

from lowrank_core import evaluate as evaluate_mod
from lowrank_core import stats
from lowrank_core.data import iter_encoded_batches, make_split
from lowrank_core.models import load_model

TEACHER_JOB = "lowrank_pending_teacher"


@pytest.fixture(autouse=True)
def no_cached_teacher():
    """Every test scores the teacher itself, and leaves no score behind for other files' tests."""
    from ui import cache

    cache.forget("teacher_eval")
    yield
    cache.forget("teacher_eval")


@pytest.fixture(scope="module")
def tiny():
    lm = load_model("tiny", device="cpu")
    split = make_split("chatterbot", n_calib=16, n_eval=32, n_val=0, seed=0)
    return lm, split


# ----------------------------------------------------------------------------- engine
@pytest.mark.parametrize("batch_size", [1, 4])
def test_streamed_estimate_ends_at_evaluate_with_the_ratio_se(tiny, batch_size, monkeypatch):
    lm, split = tiny
    monkeypatch.setattr(stats, "MIN_LOSS_INTERVAL_N", 20)  # the interval's mechanics at 32 examples (the real
    # threshold, where its coverage holds on the embedded model's rows, is set by tests/test_stats.py)
    estimates = list(evaluate_mod.iter_loss_estimates(lm.model, lm.tokenizer, split.eval, batch_size=batch_size,
                                                      max_len=128))
    expected = evaluate_mod.evaluate(lm.model, lm.tokenizer, split.eval, batch_size=batch_size, max_len=128)
    last = estimates[-1]
    assert len(estimates) == math.ceil(32 / batch_size)
    assert [e.examples for e in estimates] == sorted({min(32, (i + 1) * batch_size) for i in range(len(estimates))})
    assert last.loss == pytest.approx(expected.loss, abs=1e-9) and last.tokens == expected.tokens
    assert last.result().fingerprint == expected.fingerprint and last.examples == expected.examples == 32
    assert last.total == 32 and not last.stopped
    # the SE is the delta-method SE of Σ loss_i / Σ tokens_i over the per-example sums
    sums, tokens = [], []
    for batch, _ in iter_encoded_batches(lm.tokenizer, split.eval, batch_size, 128):
        with evaluate_mod.torch.inference_mode():
            s, k = evaluate_mod.answer_loss_rows(lm.model, batch)
        sums += s
        tokens += k
    assert stats.ratio(tokens, sums) == pytest.approx(last.loss, abs=1e-9)
    assert last.se == pytest.approx(stats.ratio_se(tokens, sums), rel=1e-6)
    lo, hi = last.interval  # the t interval with N − 1 = 31 df (32 examples >= the threshold)
    assert lo < last.loss < hi and hi - lo == pytest.approx(2 * 2.039513 * last.se, rel=1e-5)


def test_row_sums_add_up_to_the_batch_sum(tiny):
    lm, split = tiny
    batch, _ = next(iter_encoded_batches(lm.tokenizer, split.eval, 4, 128))
    with evaluate_mod.torch.inference_mode():
        rows, tokens = evaluate_mod.answer_loss_rows(lm.model, batch)
        total, n = evaluate_mod.answer_loss_sum(lm.model, batch)
    assert sum(tokens) == n and sum(rows) == pytest.approx(total, rel=1e-9) and len(rows) == 4


def test_first_estimate_comes_after_one_batch_and_describes_itself(tiny, monkeypatch):
    lm, split = tiny
    monkeypatch.setattr(stats, "MIN_LOSS_INTERVAL_N", 20)  # within the 32 examples (the real one: test_stats.py)
    stream = evaluate_mod.iter_loss_estimates(lm.model, lm.tokenizer, split.eval, batch_size=1, max_len=128)
    first, second = next(stream), next(stream)
    assert first.examples == 1 and math.isinf(first.se) and math.isinf(first.half_width)
    assert second.examples == 2 and math.isfinite(second.se) and math.isinf(second.half_width)  # N < 20: none shown
    assert second.describe("teacher loss") == (f"teacher loss {second.loss:.4f} (2 examples; interval shown from "
                                               f"N ≥ 20 (its coverage fails below that on "
                                               "skewed, heavy-tailed examples))")
    for estimate in stream:
        if estimate.examples == 20:
            break
    assert estimate.describe("teacher loss") == (f"teacher loss {estimate.loss:.4f} ± {estimate.half_width:.4f} "
                                                 f"(95%, 20 examples)")
    stream.close()
    assert not evaluate_mod.torch.is_inference_mode_enabled()  # a paused stream leaves the caller alone


def test_bad_arguments_are_refused_before_scoring(tiny):
    lm, split = tiny
    with pytest.raises(ValueError, match="must be >= 1"):
        next(evaluate_mod.iter_loss_estimates(lm.model, lm.tokenizer, split.eval, n=0))
    with pytest.raises(ValueError, match="level"):
        next(evaluate_mod.iter_loss_estimates(lm.model, lm.tokenizer, split.eval, level=1.5))
    with pytest.raises(evaluate_mod.EvaluationError, match="no answer tokens"):
        list(evaluate_mod.iter_loss_estimates(lm.model, lm.tokenizer, split.eval[:2], max_len=8))


# ----------------------------------------------------------------------------- the Model & data page
def slowed(monkeypatch, after: int):
    """Score normally for ``after`` batches, then wait on the returned gate (set it to go on); ``calls.reached``
    is set when the job sits at the gate (no clock involved: a slow machine only waits longer)."""
    gate, real, calls = threading.Event(), evaluate_mod.answer_loss_rows, Calls()

    def slow(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            calls.reached.set()
            gate.wait(600)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_mod, "answer_loss_rows", slow)
    return gate, calls


class Calls(list):
    def __init__(self):
        super().__init__()
        self.reached = threading.Event()


def test_running_estimate_shows_with_its_interval_then_stop_keeps_it(monkeypatch):
    from ui import cache

    gate, calls = slowed(monkeypatch, after=3)
    at = started()
    at.button(key="score_teacher").click().run()
    assert not at.exception, at.exception
    job = at.session_state[TEACHER_JOB]
    assert calls.reached.wait(600)  # the first three batches score at once, the fourth waits on the gate
    at.run()
    assert not at.exception, at.exception
    shown = metrics(at)
    assert shown["95% interval"] == "—" and shown["examples"] == "3 of 32"  # no interval below MIN_LOSS_INTERVAL_N
    estimate = job.info["latest"]["estimate"]
    assert shown["teacher answer loss"] == f"{estimate.loss:.4f}"
    bars = [str(getattr(p, "proto", p)) for p in at.get("progress")]
    assert any(estimate.describe("teacher loss") in b for b in bars), bars
    job.request_stop()
    gate.set()
    assert job.wait(60)
    at.run()
    assert not at.exception, at.exception
    assert TEACHER_JOB not in at.session_state
    (kept,) = at.session_state["lowrank_teacher_estimates"].values()
    assert kept.stopped and 3 <= kept.examples < 32 and math.isfinite(kept.se)
    warning = texts(at.warning)
    assert f"Stopped after {kept.examples} of 32 examples" in warning and kept.describe("teacher loss") in warning
    assert metrics(at)["teacher answer loss"] == f"{kept.loss:.4f}"
    assert all(v is None for v in [cache.cached("teacher_eval", k) for k in
                                   at.session_state["lowrank_teacher_estimates"]])  # a partial is not cached
    assert at.button(key="score_teacher").label.startswith("Score the teacher again")


def test_completed_run_equals_the_engine_and_fills_the_cache(tiny):
    from ui import cache

    lm, split = tiny
    at = scored_teacher(started())
    expected = evaluate_mod.evaluate(lm.model, lm.tokenizer, split.eval, max_len=128)
    shown = metrics(at)
    assert shown["teacher answer loss"] == f"{expected.loss:.4f}" and shown["answer tokens"] == f"{expected.tokens:,}"
    assert shown["examples"] == "32" and shown["95% interval"] == "—"  # 32 < stats.MIN_LOSS_INTERVAL_N
    (key,) = at.session_state["lowrank_teacher_estimates"]
    cached = cache.cached("teacher_eval", key)
    assert isinstance(cached, evaluate_mod.EvalResult)
    assert round(cached.loss, 4) == round(expected.loss, 4) and cached.tokens == expected.tokens
    assert cached.fingerprint == expected.fingerprint and key[2:] == (32, 128)

