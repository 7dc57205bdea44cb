"""Paths typed into the app live in the workspace (``lowrank_core.workspace``): the caption that says so."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from lowrank_core.workspace import workspace_dir


def workspace_caption(container=st) -> None:
    """One line under a path input: where relative paths point, and that nothing outside is touched."""
    container.caption(f"Paths are relative to the workspace `{workspace_dir()}`; "
                      "nothing outside it is read or written.")


def typed_or_current(typed: str, current: str) -> str:
    """What was typed, or ``current`` when nothing was or when it names the same place: a source applied
    from a typed path is stored resolved inside the workspace, while the input keeps what was typed."""
    if not typed or typed == current:
        return current
    try:
        same = (workspace_dir() / typed).resolve() == Path(current)
    except (OSError, RuntimeError, ValueError):
        same = False
    return current if same else typed
