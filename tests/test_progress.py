"""Progress as typed events and one stop token: engine reports carry their stage and metrics through the
plain ``progress(done, total, message)`` callbacks, the app's live healing curve comes from those metrics,
a stop request cancels a compression / healing job and ends a comparison keeping what it scored, and no
face reads numbers or stages back out of a progress message."""
from __future__ import annotations

import ast
import threading
from pathlib import Path

import pytest

from lowrank_core.compare import CompareSettings, compare_models
from lowrank_core.compress import CompressSettings
from lowrank_core.data import make_split
from lowrank_core.heal import HealSettings
from lowrank_core.models import load_model
from lowrank_core.progress import (CancelToken, Cancelled, ProgressEvent, TqdmProgress, ensure_progress, no_progress,
                                   staged, takes_events)
from ui import jobs
from ui.state import Settings

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("lowrank_core", "ui", "pages", "bench", "app.py")


@pytest.fixture(scope="module")
def app_inputs():
    settings = Settings(model_source="tiny", data_source="chatterbot", n_calib=8, n_eval=8, seed=0, max_len=64)
    lm = load_model("tiny", dtype="float32", device="cpu")
    split = make_split("chatterbot", n_calib=8, n_eval=8, seed=0)
    return settings, lm, split


def healing_spec(settings, tokens: int = 900):
    return jobs.job_spec(settings, "mlp:r8", CompressSettings(calib=8, max_len=64),
                         HealSettings(tokens=tokens, batch_tokens=128, max_len=64, eval_every=2, patience=50))


def started(work, **info) -> tuple[jobs.BackgroundJob, threading.Event]:
    """A BackgroundJob whose work waits on the returned gate (so the test holds the job before it runs)."""
    gate = threading.Event()

    def gated(progress):
        assert gate.wait(30)
        return work(progress)

    return jobs.BackgroundJob("test", gated, **info), gate


# ----------------------------------------------------------------------------- the callback protocol
def test_plain_callbacks_keep_working_and_event_callbacks_see_stage_and_metrics():
    plain, rich = [], []

    def event_callback(done, total, message="", *, stage="", metrics=None):
        rich.append(ProgressEvent(stage, done, total, message, dict(metrics or {})))

    assert not takes_events(lambda d, t, m: None) and takes_events(event_callback)
    assert takes_events(lambda d, t, m="", **event: None) and takes_events(no_progress)
    assert ensure_progress(event_callback) is event_callback and ensure_progress(None) is no_progress
    ensure_progress(lambda d, t, m: plain.append((d, t, m)))(2, 5, "x", stage="heal", metrics={"loss": 1.0})
    assert plain == [(2, 5, "x")]

    phase = staged(event_callback, "compress", "compress: ")
    phase(1, 4, "factorising a")                                 # no stage of its own: the phase's
    phase(3, 9, "step", stage="layer", metrics={"mse": 0.5})     # its own stage and metrics go through
    staged(lambda d, t, m: plain.append((d, t, m)), "heal", "heal: ")(7, 8, "kl")  # a plain callback behind
    assert rich == [ProgressEvent("compress", 1, 4, "compress: factorising a"),
                    ProgressEvent("layer", 3, 9, "compress: step", {"mse": 0.5})]
    assert plain[-1] == (7, 8, "heal: kl")
    assert rich[1].text() == "compress: step (3/9)" and rich[1].fraction == pytest.approx(1 / 3)


def test_tqdm_draws_one_bar_per_stage():
    bar = TqdmProgress("job")
    try:
        bar(1, 4, "a", stage="compress")
        first = bar._bar
        bar(2, 4, "b", stage="compress")
        assert bar._bar is first and bar._bar.n == 2
        bar(1, 4, "c", stage="heal", metrics={"train_loss": 0.3})  # same total, another stage: a new bar
        assert bar._bar is not first and bar._bar.n == 1 and "heal" in bar._bar.desc
    finally:
        bar.close()


def test_the_token_raises_cancelled_once_asked():
    token = CancelToken()
    token.check()
    token.cancel()
    assert token.cancelled
    with pytest.raises(Cancelled):
        token.check()


# ----------------------------------------------------------------------------- the app's jobs
def test_the_app_jobs_live_healing_curve_comes_from_the_metrics(app_inputs):
    settings, lm, split = app_inputs
    job, gate = started(lambda p: jobs.run_app_job(healing_spec(settings), lm, split, p))
    gate.set()
    assert job.wait(120) and job.error is None, job.error
    healed = job.result.healed
    curve = job.heal_curve
    assert healed.steps >= 3 and len(curve) == healed.steps
    assert [train for _, train, _ in curve] == healed.curve["train"]
    assert {valid for _, _, valid in curve} <= set(healed.curve["valid"])
    assert curve[-1][0] == min(healed.tokens, 900)
    stages = {e.stage: e for e in job.snapshot()}
    assert {"compress", "heal"} <= set(stages) and stages["heal"].message.startswith("heal: heal kl")
    assert stages["heal"].metrics == {"train_loss": curve[-1][1], "valid_loss": curve[-1][2]}


def test_a_stop_request_cancels_a_compression_and_healing_job(app_inputs):
    settings, lm, split = app_inputs
    holder = {}

    def work(progress):
        def report(done, total, message="", *, stage="", metrics=None):
            if stage == "heal" and len(holder.setdefault("heal", [])) == 2:
                holder["job"].request_stop()  # the stop button, pressed while healing runs
            if stage == "heal":
                holder["heal"].append(done)
            progress(done, total, message, stage=stage, metrics=metrics)
        return jobs.run_app_job(healing_spec(settings, tokens=5000), lm, split, report)

    job, gate = started(work)
    holder["job"] = job
    gate.set()
    assert job.wait(120)
    assert job.cancelled and isinstance(job.error, Cancelled) and job.result is None
    assert len(job.heal_curve) == 2 and holder["heal"][-1] < 5000  # stopped at the report after the request
    assert job.failure("Compression") == "Compression stopped on request: nothing was kept."


def test_a_stop_request_before_any_work_cancels_a_compression(app_inputs):
    settings, lm, split = app_inputs
    job, gate = started(lambda p: jobs.run_app_job(healing_spec(settings, tokens=0), lm, split, p))
    job.request_stop()
    gate.set()
    assert job.wait(60) and job.cancelled and job.snapshot() == []


def test_the_same_token_ends_a_comparison_keeping_what_was_scored(app_inputs):
    _, lm, split = app_inputs
    holder = {}

    def work(progress):
        def report(done, total, message="", *, stage="", metrics=None):
            progress(done, total, message, stage=stage, metrics=metrics)
            if done >= 4:
                holder["job"].request_stop()
        return compare_models(lm.model, {"student": lm.model}, lm.tokenizer, split.eval,
                              CompareSettings(examples=8, batch_size=2), progress=report)

    job, gate = started(work)
    holder["job"] = job
    gate.set()
    assert job.wait(60) and job.error is None and not job.cancelled
    comparison = job.result["student"]
    assert comparison.stopped and comparison.examples == 6  # the report after the request raised
    (event,) = job.snapshot()
    assert event.stage == "compare" and event.done == 4 and event.metrics["delta"] == pytest.approx(0.0, abs=1e-6)
    assert [m["delta"] for _, m in job.series("compare")] == pytest.approx([0.0, 0.0], abs=1e-6)


# ----------------------------------------------------------------------------- nothing parses messages
_CALLBACK_ARGS = ({"done", "d"}, {"total", "t"}, {"message", "msg", "m", "_message"})
_STR_METHODS = set(dir(str)) - set(dir(object))
_PARSERS = ("parse", "point", "phase", "match", "search", "split", "float", "int", "findall", "number")


def _message_name(node) -> str | None:
    """The message parameter of a progress callback ``(done, total, message, ...)``, else None."""
    names = [a.arg for a in node.args.posonlyargs + node.args.args]
    if names and names[0] == "self":
        names = names[1:]
    if len(names) >= 3 and all(n in allowed for n, allowed in zip(names, _CALLBACK_ARGS)):
        return names[2]
    return None


def message_parsing(source: str) -> list[str]:
    """Where a progress callback reads its message as data: a str method on it (``message.startswith``),
    a test on it (``"loss" in message``), an index into it, or the message handed to a regex or parser
    (``re.search(..., message)``, ``float(message)``, ``progress_point(message)``, ``phase_of(message)``).
    Passing it on, formatting it into another message and truncating it (a slice) are fine."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.Lambda)) or (name := _message_name(fn)) is None:
            continue
        label = getattr(fn, "name", "<lambda>")
        body = fn.body if isinstance(fn.body, list) else [fn.body]
        for node in (n for stmt in body for n in ast.walk(stmt)):
            is_msg = lambda n: isinstance(n, ast.Name) and n.id == name  # noqa: E731
            if isinstance(node, ast.Attribute) and is_msg(node.value) and node.attr in _STR_METHODS:
                found.append(f"{label}:{node.lineno}: {name}.{node.attr}")
            elif isinstance(node, ast.Compare) and any(is_msg(c) for c in node.comparators) and any(
                    isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
                found.append(f"{label}:{node.lineno}: a test on {name}")
            elif isinstance(node, ast.Subscript) and is_msg(node.value) and not isinstance(node.slice, ast.Slice):
                found.append(f"{label}:{node.lineno}: {name}[...]")
            elif isinstance(node, ast.Call) and any(is_msg(a) for a in node.args):
                callee = ast.unparse(node.func)
                if callee.startswith("re.") or any(p in callee.lower() for p in _PARSERS):
                    found.append(f"{label}:{node.lineno}: {callee}({name})")
    return found


OLD_PARSERS = {  # what the tree did before progress carried typed events: each must be caught
    "the app's job": '''
class BackgroundJob:
    def progress(self, done, total, message=""):
        point = progress_point(message)
        phase = phase_of(message)
''',
    "a regex on the message": 'cb = lambda d, t, m: re.search(r"loss ([0-9.]+)", m)',
    "the bench's layer clock": '''
def clock(done, total, message=""):
    if message.startswith("layer "):
        marks.append(done)
''',
    "a number read out of the message": 'def f(done, total, message):\n    loss = float(message.split()[-1])\n',
    "a word tested in the message": 'def f(d, t, msg):\n    if "valid" in msg:\n        pass\n',
}


@pytest.mark.parametrize("what", OLD_PARSERS)
def test_the_parsing_check_catches_each_old_way(what):
    assert message_parsing(OLD_PARSERS[what]), what


def test_passing_formatting_and_truncating_a_message_is_not_parsing():
    source = '''
def _phase(progress, name):
    return lambda done, total, message="": progress(done, total, f"{name}: {message}")
class Bar:
    def __call__(self, done, total, message="", *, stage="", metrics=None):
        self._bar.set_postfix_str(message[:60])
        self.events.append(ProgressEvent(stage, done, total, message, metrics))
'''
    assert message_parsing(source) == []


def test_no_face_parses_progress_messages():
    files = [p for name in SOURCES for p in ([ROOT / name] if name.endswith(".py") else (ROOT / name).rglob("*.py"))]
    assert len(files) > 40
    found = [f"{path.relative_to(ROOT)}:{where}" for path in files for where in message_parsing(path.read_text())]
    assert found == []
