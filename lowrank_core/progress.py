"""Progress reporting shared by the engine, the CLI (tqdm) and the app (st.progress).

A progress callback is any callable ``progress(done, total, message)``: ``done`` and ``total`` are
counts of work units (examples, layers, steps), ``message`` is a short human-readable label.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

Progress = Callable[[int, int, str], None]


def no_progress(done: int, total: int, message: str = "") -> None:
    """A progress callback that does nothing."""


def ensure_progress(progress: Optional[Progress]) -> Progress:
    return progress if progress is not None else no_progress


class TqdmProgress:
    """Progress callback drawing one tqdm bar per distinct ``total`` phase, on stderr."""

    def __init__(self, desc: str = ""):
        self.desc = desc
        self._bar = None
        self._total = None

    def __call__(self, done: int, total: int, message: str = "") -> None:
        from tqdm import tqdm

        if self._bar is None or total != self._total or done < self._bar.n:
            self.close()
            self._bar = tqdm(total=total, desc=self.desc, file=sys.stderr, leave=False, dynamic_ncols=True)
            self._total = total
        self._bar.set_postfix_str(message[:60], refresh=False)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
