"""Progress reporting shared by the engine, the CLI (tqdm) and the app (st.progress), and the one way to stop.

A progress callback is any callable ``progress(done, total, message)``: ``done`` and ``total`` are
counts of work units (examples, layers, steps), ``message`` is a short label for people. A report may
carry its structured part as keywords, ``progress(done, total, message, stage="heal",
metrics={"train_loss": 0.12, "valid_loss": 0.2})``: ``stage`` names the unit of work the counts belong to
(one bar per stage), ``metrics`` the numbers a chart plots. Callbacks that take these keywords see a
:class:`ProgressEvent`; plain three-argument callbacks keep working (:func:`ensure_progress` drops the
keywords for them). Nothing reads numbers or stages back out of a message.

Stopping: a background job's :class:`CancelToken` makes its progress callback raise :class:`Cancelled`
at the next report. Work that can keep a partial result catches it (a comparison keeps what was scored);
any other work ends with it.
"""
from __future__ import annotations

import inspect
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

Progress = Callable[..., None]  # progress(done, total, message="", *, stage="", metrics=None)


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report: ``done`` of ``total`` units of ``stage``, a label, and typed numbers."""

    stage: str
    done: int
    total: int
    message: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return 0.0 if self.total <= 0 else min(1.0, max(0.0, self.done / self.total))

    def text(self) -> str:
        """What a bar shows: the message and the counts."""
        return f"{self.message} ({self.done}/{self.total})" if self.total > 0 else f"{self.message} ({self.done})"


class Cancelled(Exception):
    """The work was asked to stop (a :class:`CancelToken`, checked at each progress report)."""


class CancelToken:
    """A stop request shared between the thread that asks and the work that checks (thread-safe)."""

    def __init__(self):
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`Cancelled` once a stop was requested."""
        if self._event.is_set():
            raise Cancelled


def no_progress(done: int, total: int, message: str = "", **event) -> None:
    """A progress callback that does nothing."""


def takes_events(progress: Callable) -> bool:
    """Does ``progress`` accept the ``stage`` and ``metrics`` keywords (named or ``**kwargs``)?"""
    try:
        params = inspect.signature(progress).parameters.values()
    except (TypeError, ValueError):
        return False
    named = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return any(p.kind is p.VAR_KEYWORD for p in params) or {"stage", "metrics"} <= named


def ensure_progress(progress: Optional[Progress]) -> Progress:
    """A callback taking the event keywords: ``progress`` itself, a forwarder dropping them for a plain
    ``(done, total, message)`` callback, or :func:`no_progress` for None."""
    if progress is None:
        return no_progress
    if takes_events(progress):
        return progress

    def plain(done: int, total: int, message: str = "", *, stage: str = "", metrics=None) -> None:
        progress(done, total, message)

    return plain


def staged(progress: Optional[Progress], stage: str, prefix: str = "") -> Progress:
    """``progress`` with every report under ``stage`` unless it names its own, and ``prefix`` before its
    message (a job's phases: ``staged(progress, "heal", "heal: ")``)."""
    progress = ensure_progress(progress)
    outer = stage

    def report(done: int, total: int, message: str = "", *, stage: str = "", metrics=None) -> None:
        progress(done, total, prefix + message, stage=stage or outer, metrics=metrics)

    return report


class TqdmProgress:
    """Progress callback drawing one tqdm bar per stage (a new bar when the stage or its total changes or
    its count goes back), the message as its postfix, on stderr."""

    def __init__(self, desc: str = ""):
        self.desc = desc
        self._bar = None
        self._key = None

    def __call__(self, done: int, total: int, message: str = "", *, stage: str = "", metrics=None) -> None:
        from tqdm import tqdm

        event = ProgressEvent(stage, done, total, message, dict(metrics or {}))
        if self._bar is None or (event.stage, event.total) != self._key or event.done < self._bar.n:
            self.close()
            desc = f"{self.desc} {event.stage}".strip() if event.stage != self.desc else self.desc
            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
            self._key = (event.stage, event.total)
        self._bar.set_postfix_str(event.message[:60], refresh=False)
        self._bar.update(event.done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
