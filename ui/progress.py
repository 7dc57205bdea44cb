"""The app's ``progress(done, total, message)`` adapter: ``st.progress`` bars inside a container."""
from __future__ import annotations

import contextlib
import re
import time

import streamlit as st


# How often a page polls a background job. Each tick reruns the page's fragment in the server; at 0.5 s the
# polling alone made a compression of the embedded default 4x slower than in the CLI (251 s vs 62 s on 2
# cores); at 2 s the job runs at CLI speed (59 s).
POLL_SECONDS = 2.0


def phase_of(message: str) -> str:
    """The message up to its first digit: 'refit layer 3 loss 0.1' -> 'refit layer'."""
    return re.split(r"\d", message, maxsplit=1)[0].strip(" :.·-") or "progress"


class StreamlitProgress:
    """Callable progress for engine functions: one bar per phase (messages that differ only from their
    first digit on share a bar), so an outer per-layer bar and an inner per-step bar both stay visible.
    Each bar is redrawn at most every ``min_interval`` seconds (and always at its end)."""

    def __init__(self, container=None, min_interval: float = 0.15):
        self._container = container if container is not None else st
        self._bars: dict[str, object] = {}
        self._last: dict[str, float] = {}
        self._min_interval = min_interval
        self.calls = 0

    def __call__(self, done: int, total: int, message: str = "") -> None:
        self.calls += 1
        phase = phase_of(message)
        now = time.monotonic()
        if phase in self._bars and done < total and now - self._last[phase] < self._min_interval:
            return
        self._last[phase] = now
        frac = 0.0 if total <= 0 else min(1.0, max(0.0, done / total))
        text = f"{message} ({done}/{total})" if total > 0 else f"{message} ({done})"
        if phase not in self._bars:
            self._bars[phase] = self._container.progress(frac, text=text)
        else:
            self._bars[phase].progress(frac, text=text)


def draw_phases(phases: list[tuple[int, int, str]], waiting: str) -> None:
    """One bar per phase of a background job's ``snapshot()``; ``waiting`` before its first report."""
    if not phases:
        st.write(waiting)
    for done, total, message in phases:
        st.progress(min(1.0, done / total) if total > 0 else 0.0,
                    text=f"{message} ({done}/{total})" if total > 0 else message)


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
