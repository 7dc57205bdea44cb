"""The app's ``progress(done, total, message, stage=, metrics=)`` adapter: ``st.progress`` bars inside a
container, one per stage of the reports (``lowrank_core.progress.ProgressEvent``)."""
from __future__ import annotations

import contextlib
import time

import streamlit as st

from lowrank_core.progress import ProgressEvent


# How often a page polls a background job. Each tick reruns the page's fragment in the server; at 0.5 s the
# polling alone made a compression of the embedded default 4x slower than in the CLI (251 s vs 62 s on 2
# cores); at 2 s the job runs at CLI speed (59 s).
POLL_SECONDS = 2.0


class StreamlitProgress:
    """Callable progress for engine functions: one bar per stage of the reports, so an outer per-layer
    bar and an inner per-step bar both stay visible. Each bar is redrawn at most every ``min_interval``
    seconds (and always at its end)."""

    def __init__(self, container=None, min_interval: float = 0.15):
        self._container = container if container is not None else st
        self._bars: dict[str, object] = {}
        self._last: dict[str, float] = {}
        self._min_interval = min_interval
        self.calls = 0

    def __call__(self, done: int, total: int, message: str = "", *, stage: str = "", metrics=None) -> None:
        self.calls += 1
        event = ProgressEvent(stage, done, total, message, dict(metrics or {}))
        now = time.monotonic()
        if stage in self._bars and done < total and now - self._last[stage] < self._min_interval:
            return
        self._last[stage] = now
        if stage not in self._bars:
            self._bars[stage] = self._container.progress(event.fraction, text=event.text())
        else:
            self._bars[stage].progress(event.fraction, text=event.text())


def draw_phases(events: list[ProgressEvent], waiting: str) -> None:
    """One bar per stage of a background job's ``snapshot()``; ``waiting`` before its first report."""
    if not events:
        st.write(waiting)
    for event in events:
        st.progress(event.fraction, text=event.text())


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


@contextlib.contextmanager
def job_status(job, label: str, waiting: str):
    """Inside a polling fragment: rerun the page once ``job`` (a ``jobs.BackgroundJob``) has finished, else
    an open ``st.status`` with the elapsed time, an estimate of the time left and one bar per phase; the
    caller adds its own lines inside."""
    if job.finished:
        st.rerun()
    left = job.seconds_left()
    eta = f", about {_duration(left)} left" if left is not None else ""
    with st.status(f"{label} — {_duration(time.monotonic() - job.started)}{eta}", expanded=True):
        draw_phases(job.snapshot(), waiting)
        yield


def run_with_status(label: str, work, done_label: str | None = None):
    """Run ``work(progress)`` inside ``st.status``; the status turns complete (or error) afterwards."""
    with st.status(label, expanded=True) as status:
        start = time.perf_counter()
        try:
            value = work(StreamlitProgress(status))
        except Exception:
            status.update(label=f"{label} — failed", state="error", expanded=True)
            raise
        status.update(label=f"{done_label or label} — done in {time.perf_counter() - start:.1f} s",
                      state="complete", expanded=False)
    return value
