"""Process-wide caches of the app: model + tokenizer, configs, data splits, teacher scores, Grams.

Keys are plain values (model fingerprint, split fingerprint, sizes), so a widget change never
recomputes anything heavy. Values stay in memory (no pickling); ``memo`` lets the computing code
draw its own progress bar on a miss and draws nothing on a hit.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Hashable

import streamlit as st

from lowrank_core.linears import linear_map, meta_model
from lowrank_core.data import make_split
from lowrank_core.models import load_config, load_model

from .entry import stop_page
from .state import Settings


@st.cache_resource(max_entries=1, show_spinner="Loading the model…")
def loaded_model(source: str, dtype: str, device: str):
    """``models.LoadedModel`` for a source; one model is kept (switching evicts the previous one)."""
    return load_model(source, dtype=dtype, device=device)


@st.cache_resource(max_entries=8, show_spinner=False)
def model_config(source: str):
    """``PretrainedConfig`` of a source, no weights (for accounting and the architecture map)."""
    return load_config(source)


@st.cache_resource(show_spinner=False)
def _store() -> dict:
    return {"lock": threading.Lock(), "kinds": {}}


def memo(kind: str, key: Hashable, compute: Callable[[], object], max_entries: int = 8):
    """``compute()`` once per ``(kind, key)``; at most ``max_entries`` values per kind (LRU)."""
    store = _store()
    with store["lock"]:
        table = store["kinds"].setdefault(kind, OrderedDict())
        if key in table:
            table.move_to_end(key)
            return table[key]
    value = compute()
    with store["lock"]:
        table[key] = value
        while len(table) > max_entries:
            table.popitem(last=False)
    return value


def forget(kind: str) -> None:
    """Drop every memoised value of ``kind`` (the next page that needs one computes it again)."""
    store = _store()
    with store["lock"]:
        store["kinds"].pop(kind, None)


def cached(kind: str, key: Hashable):
    """The memoised value or None, without computing anything."""
    table = _store()["kinds"].get(kind, {})
    return table.get(key)


def current_model(s: Settings):
    """The loaded model of the settings, or None after showing why it cannot be loaded."""
    try:
        lm = loaded_model(s.model_source, s.dtype, s.device)
    except ValueError as e:
        st.error(f"Model {s.model_source!r} could not be loaded: {e}")
        return None
    memo("model", _model_key(s), lambda: lm, max_entries=1)
    return lm


def _model_key(s: Settings) -> tuple:
    return (s.model_source, s.dtype, s.device)


def cached_model(s: Settings):
    """The model of the settings if a page already loaded it, else None (loads nothing)."""
    return cached("model", _model_key(s))


def require_model(s: Settings):
    """Like ``current_model`` but stops the page when there is no model."""
    lm = current_model(s)
    if lm is None:
        st.info("Pick a model with weights on the **Model & data** page.")
        stop_page()
    return lm


def linears(lm, parts: bool = False) -> list:
    """``linears.linear_map`` of a loaded model, cached by its fingerprint (``parts``: with the parts of fused
    linears, what a plan resolves on)."""
    return memo("linear_map", (lm.fingerprint, parts), lambda: linear_map(lm.model, parts=parts))


def config_linears(source: str, parts: bool = False) -> tuple:
    """(meta-device model, its linears) from a source's config alone: no weights are read."""
    meta = memo("meta_model", source, lambda: meta_model(model_config(source)), max_entries=4)
    return meta, memo("meta_linears", (source, parts), lambda: linear_map(meta, parts=parts), max_entries=4)


def split_key(s: Settings) -> tuple:
    return (s.data_source, s.n_calib, s.n_val, s.n_eval, s.seed)


def data_split(s: Settings):
    """``data.Split`` of the settings (calib / val / eval examples), cached by source, sizes and seed."""
    def compute():
        with st.spinner(f"Reading data {s.data_source!r} and splitting it…"):
            return make_split(s.data_source, n_calib=s.n_calib, n_eval=s.n_eval, n_val=s.n_val, seed=s.seed)

    return memo("split", split_key(s), compute, max_entries=4)
