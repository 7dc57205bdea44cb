"""The app's ``progress(done, total, message)`` adapter: an ``st.progress`` bar in a container."""
from __future__ import annotations

import time

import streamlit as st


class StreamlitProgress:
    """Callable progress for engine functions; draws one bar, updated at most every ``min_interval`` s.

    A new phase (a different ``total`` or ``done`` going back) restarts the bar; ``prefix`` labels it.
    """

    def __init__(self, container=None, prefix: str = "", min_interval: float = 0.1):
        self._container = container if container is not None else st
        self._bar = None
        self._prefix = prefix
        self._min_interval = min_interval
        self._last = 0.0
        self.calls = 0

    def __call__(self, done: int, total: int, message: str = "") -> None:
        self.calls += 1
        now = time.monotonic()
        if self._bar is not None and done < total and now - self._last < self._min_interval:
            return
        self._last = now
        frac = 0.0 if total <= 0 else min(1.0, max(0.0, done / total))
        text = " · ".join(p for p in (self._prefix, message, f"{done}/{total}") if p)
        if self._bar is None:
            self._bar = self._container.progress(frac, text=text)
        else:
            self._bar.progress(frac, text=text)


def run_with_status(label: str, work, done_label: str | None = None):
    """Run ``work(progress)`` inside ``st.status``; the status turns complete (or error) afterwards."""
    with st.status(label, expanded=True) as status:
        start = time.perf_counter()
        try:
            value = work(StreamlitProgress(status))
        except Exception:
            status.update(label=f"{label} — failed", state="error")
            raise
        status.update(label=f"{done_label or label} — done in {time.perf_counter() - start:.1f} s",
                      state="complete", expanded=False)
    return value
