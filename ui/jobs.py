"""Compression jobs of the session: the app's JobSpec, a stable key per job, finished results, the runs table.

The app runs the engine's one job function (``lowrank_core.job.run_job``) on the model and split it
keeps cached; evaluation and export are later steps on the same ``JobResult`` (Evaluate and Export pages).
"""
from __future__ import annotations

import hashlib
import json
import threading
import time

import streamlit as st

from lowrank_core.heal import HealSettings
from lowrank_core.job import DataSpec, JobResult, JobSpec, ModelSpec, run_job
from lowrank_core.progress import CancelToken, Cancelled, ProgressEvent
from lowrank_core.threads import pin_thread

from . import state

MAX_RESULTS = 4  # students kept in memory (each holds its own factor tensors)


def job_spec(s: state.Settings, plan, settings, heal: HealSettings | None = None) -> JobSpec:
    """The JobSpec of the app's choices: model and data from the Model & data page, the plan, the
    compression and healing settings from the Compress form (its calibration size is ``data.calib``)."""
    return JobSpec(plan=plan, name="app",
                   model=ModelSpec(source=s.model_source, dtype=s.dtype, device=s.device),
                   data=DataSpec(source=s.data_source, seed=s.seed, calib=settings.calib, eval=s.n_eval, val=s.n_val),
                   method=settings, heal=heal or HealSettings())


def run_app_job(spec: JobSpec, lm, split, progress) -> JobResult:
    """The app's backend: the engine's ``run_job`` on the cached model and split; evaluation and export
    are left to the Evaluate and Export pages (``job.evaluate_job`` / ``job.export_job``)."""
    return run_job(spec, progress=progress, loaded=lm, split=split, evaluate=False, export=False)


def job_key(fingerprint: str, split_fingerprint: str, spec: JobSpec) -> str:
    """Same model, data, plan and settings -> same key, so a finished job is reused, never rerun."""
    blob = json.dumps({"model": fingerprint, "split": split_fingerprint, "job": spec.to_dict()},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def store_result(key: str, job: JobResult) -> dict:
    """Keep the JobResult (newest ``MAX_RESULTS``), make it current, and add its row to the runs table."""
    results = state.results()
    results[key] = job
    for old in list(results)[:-MAX_RESULTS]:
        results.pop(old)
    st.session_state[state.CURRENT_KEY] = key
    result, lm, spec = job.compressed, job.loaded, job.spec
    errors = result.errors()
    row = {"run": len(state.runs()) + 1, "job": key, "time": time.strftime("%H:%M:%S"), "model": lm.name,
           "fingerprint": lm.fingerprint, "plan": spec.plan.describe(), "method": spec.method.method,
           "calib": spec.data.calib, "path": result.split.get("path", ""), "matrices": len(result.layers),
           "params_before": result.params_before, "params_after": result.params_after,
           "of_original": result.params_after / max(1, result.params_before),
           "mean_rel_error": sum(errors) / len(errors) if errors else None,
           "max_rel_error": max(errors) if errors else None, "seconds": result.timings.get("total"),
           "data": spec.data.source, "seed": spec.data.seed, "split": job.split.info.fingerprint,
           "eval_examples": None, "teacher_loss": None, "student_loss": None, "delta": None, "delta_lo": None,
           "delta_hi": None, "verdict": None, "margin": None, "kl": None, "top1": None,
           "teacher_ppl": None, "student_ppl": None}
    state.runs().append(row)
    return row


def record_eval(key: str, comparison) -> None:
    """Write the paired ``comparison`` of job ``key`` (``job.evaluate_job`` keeps it on the job, so its
    export manifest and model card carry it) into every runs-table row of that job."""
    teacher, student, s = comparison.eval_result("teacher"), comparison.eval_result("student"), comparison.summary()
    for row in state.runs():
        if row["job"] == key:
            row.update(eval_examples=student.examples, teacher_loss=teacher.loss, student_loss=student.loss,
                       teacher_ppl=teacher.perplexity, student_ppl=student.perplexity, delta=s["delta"],
                       delta_lo=(s["delta_ci"] or [None, None])[0], delta_hi=(s["delta_ci"] or [None, None])[1],
                       verdict=s["verdict"], margin=s["margin"], stopping_n=s.get("stopping_n"),
                       kl=s["kl"], top1=s["top1_agreement"])


def run_label(key: str) -> str:
    rows = [r for r in state.runs() if r["job"] == key]
    if not rows:
        return key
    r = rows[-1]
    return f"run {r['run']} · {r['method']} · {r['plan'][:60]} · {r['of_original']:.1%} of params"


def choose_run(label: str, keys: list[str], current: str, key: str) -> str:
    """A selectbox over finished jobs (shown by their run labels); returns the chosen job key."""
    labels = [run_label(k) for k in keys]
    picked = st.selectbox(label, labels, index=keys.index(current), key=key)
    return keys[labels.index(picked)]


def keys_for(fingerprint: str) -> list[str]:
    """Finished jobs still in memory whose teacher is the model with ``fingerprint`` (oldest first)."""
    mine = {r["job"] for r in state.runs() if r["fingerprint"] == fingerprint}
    return [k for k in state.results() if k in mine]


class BackgroundJob:
    """Runs ``work(progress)`` in a daemon thread, so no rerun of the page (a click, a page switch)
    interrupts or restarts it. The thread never touches Streamlit; pages poll ``snapshot()`` (the last
    ``ProgressEvent`` of each stage) and ``series(stage)`` (the metrics reported so far)."""

    def __init__(self, key: str, work, **info):
        self.key, self.info = key, info
        self.result = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.token = CancelToken()  # the stop request of every kind of job
        self._phases: dict[str, ProgressEvent] = {}  # stage -> its last report
        self._phase_start: dict[str, tuple[float, int]] = {}  # stage -> (time, done) of its first report
        self._last_phase: str | None = None
        self._series: dict[str, list[tuple[int, dict]]] = {}  # stage -> (done, metrics) of reports with metrics
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, args=(work,), name=f"lowrank-job-{key}", daemon=True)
        self._thread.start()

    def _run(self, work) -> None:
        pin_thread()  # the server's thread count, whatever the thread that started this one was doing
        try:
            self.result = work(self.progress)
        except BaseException as e:  # noqa: BLE001 - reported on the page
            self.error = e

    def request_stop(self) -> None:
        """Ask the work to stop: its next progress report raises ``Cancelled`` (work that catches it keeps
        what it has, as a comparison; other work ends with it: ``cancelled``)."""
        self.token.cancel()

    @property
    def stop_requested(self) -> bool:
        return self.token.cancelled

    @property
    def cancelled(self) -> bool:
        """Did the work end on a stop request (rather than finish or fail)?"""
        return isinstance(self.error, Cancelled)

    def progress(self, done: int, total: int, message: str = "", *, stage: str = "", metrics=None) -> None:
        self.token.check()
        event = ProgressEvent(stage, done, total, message, dict(metrics or {}))
        now = time.monotonic()
        with self._lock:
            last = self._phases.get(stage)
            if last is None or done < last.done or total != last.total:
                self._phase_start[stage] = (now, done)
            self._phases[stage] = event
            self._last_phase = stage
            if event.metrics:
                self._series.setdefault(stage, []).append((done, event.metrics))

    def series(self, stage: str) -> list[tuple[int, dict]]:
        """(done, metrics) of every report of ``stage`` that carried metrics, oldest first."""
        with self._lock:
            return list(self._series.get(stage, ()))

    @property
    def heal_curve(self) -> list[tuple[int, float, float]]:
        """(tokens, train loss of the last step, last validation loss) of every healing step so far."""
        return [(done, m["train_loss"], m["valid_loss"]) for done, m in self.series("heal")
                if "train_loss" in m and "valid_loss" in m]

    def seconds_left(self) -> float | None:
        """Estimated seconds left in the phase reported last (its rate so far), None before a rate exists."""
        with self._lock:
            phase = self._last_phase
            if phase is None:
                return None
            done, total = self._phases[phase].done, self._phases[phase].total
            start, first = self._phase_start[phase]
        elapsed = time.monotonic() - start
        if total <= 0 or done <= first or elapsed <= 0:
            return None
        return (total - done) * elapsed / (done - first)

    def snapshot(self) -> list[ProgressEvent]:
        with self._lock:
            return list(self._phases.values())

    def failure(self, what: str) -> str:
        """The page's message for the error that ended the job: '<what> failed: ...' ('<what> stopped on
        request: ...' after a stop request)."""
        e = self.error
        if isinstance(e, Cancelled):
            return f"{what} stopped on request: nothing was kept."
        return f"{what} failed: {e}" if isinstance(e, ValueError) else f"{what} failed: {type(e).__name__}: {e}"

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return self.finished
