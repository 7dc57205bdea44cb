"""The app's ``progress(done, total, message)`` adapter: ``st.progress`` bars inside a container."""
from __future__ import annotations

import re
import time

import streamlit as st


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
