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

from lowrank_core.compare import StopComparison
from lowrank_core.heal import HealSettings, progress_point
from lowrank_core.job import DataSpec, JobResult, JobSpec, ModelSpec, run_job

from . import state
from .progress import phase_of

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


def describe_plan(plan) -> str:
    return plan.describe()


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
           "fingerprint": lm.fingerprint, "plan": describe_plan(spec.plan), "method": spec.method.method,
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
                       delta_lo=s["delta_ci"][0], delta_hi=s["delta_ci"][1], verdict=s["verdict"], margin=s["margin"],
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
    interrupts or restarts it. The thread never touches Streamlit; pages poll ``snapshot()``."""

    def __init__(self, key: str, work, **info):
        self.key, self.info = key, info
        self.result = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self._phases: dict[str, tuple[int, int, str]] = {}
        self._phase_start: dict[str, tuple[float, int]] = {}  # phase -> (time, done) of its first report
        self._last_phase: str | None = None
        self.heal_curve: list[tuple[int, float, float]] = []  # (tokens, train loss, valid loss) while healing
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(work,), name=f"lowrank-job-{key}", daemon=True)
        self._thread.start()

    def _run(self, work) -> None:
        try:
            self.result = work(self.progress)
        except BaseException as e:  # noqa: BLE001 - reported on the page
            self.error = e

    def request_stop(self) -> None:
        """Ask the work to stop: its next progress report raises ``StopComparison`` (work that catches it
        keeps what it has; other work fails with it)."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def progress(self, done: int, total: int, message: str = "") -> None:
        if self._stop.is_set():
            raise StopComparison
        point = progress_point(message)
        now = time.monotonic()
        with self._lock:
            phase = phase_of(message)
            if phase not in self._phase_start or done < self._phases[phase][0]:
                self._phase_start[phase] = (now, done)
            self._phases[phase] = (done, total, message)
            self._last_phase = phase
            if point is not None:
                self.heal_curve.append((done, *point))

    def seconds_left(self) -> float | None:
        """Estimated seconds left in the phase reported last (its rate so far), None before a rate exists."""
        with self._lock:
            phase = self._last_phase
            if phase is None:
                return None
            done, total, _ = self._phases[phase]
            start, first = self._phase_start[phase]
        elapsed = time.monotonic() - start
        if total <= 0 or done <= first or elapsed <= 0:
            return None
        return (total - done) * elapsed / (done - first)

    def snapshot(self) -> list[tuple[int, int, str]]:
        with self._lock:
            return list(self._phases.values())

    def failure(self, what: str) -> str:
        """The page's message for the error that ended the job: '<what> failed: ...'."""
        e = self.error
        return f"{what} failed: {e}" if isinstance(e, ValueError) else f"{what} failed: {type(e).__name__}: {e}"

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return self.finished
