"""Import engine modules lazily, so a page still renders while a module it needs is not built yet."""
from __future__ import annotations

import importlib
from types import ModuleType

import streamlit as st

from .entry import stop_page


def optional(name: str) -> ModuleType | None:
    """``lowrank_core.<name>`` or None when that module file does not exist (other errors propagate)."""
    full = f"lowrank_core.{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as e:
        if e.name == full:
            return None
        raise


def require(*names: str) -> list[ModuleType]:
    """The engine modules ``names``; if one is missing, say so plainly on the page and stop it."""
    mods = [optional(n) for n in names]
    missing = [f"lowrank_core/{n}.py" for n, m in zip(names, mods) if m is None]
    if missing:
        st.info(f"This page needs {', '.join(missing)}, which is not part of the engine yet. "
                "It will work as soon as that module lands; nothing to do here.")
        stop_page()
    return mods

