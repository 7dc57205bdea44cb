"""Model & data: choose the model and the data split; architecture map and the teacher's answer loss."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
import streamlit as st

from lowrank_core.evaluate import default_batch_size, evaluate
from lowrank_core.models import DEVICES, DTYPES
from lowrank_core.workspace import app_source
from ui import cache, state
from ui.entry import ensure_app, stop_page
from ui.paths import typed_or_current, workspace_caption
from ui.progress import run_with_status

ensure_app()

MODEL_KINDS = {"Embedded SmolLM2-135M-Instruct": "default", "Tiny random Llama (for tests)": "tiny",
               "Local folder, config.json or .gguf": "path", "Hugging Face hub id": "hub"}
DATA_KINDS = {"ShareGPT first turns (default)": "default", "chatterbot corpus": "chatterbot",
              "Local OpenOrca file or folder (.parquet/.jsonl/.json)": "path", "Hugging Face hub id": "hub"}


def kind_of(source: str, fixed: tuple[str, ...]) -> str:
    if source in fixed:
        return source
    if source.startswith("tiny"):
        return "tiny"
    return "path" if Path(source).expanduser().exists() else "hub"


def choose_source(label: str, kinds: dict, current: str, fixed: tuple[str, ...], key: str) -> tuple[str, bool]:
    """(the source chosen, whether it was typed as a local path); "" when nothing is typed yet."""
    labels = list(kinds)
    now = kind_of(current, fixed)
    choice = st.selectbox(label, labels, index=[kinds[k] for k in labels].index(now), key=f"{key}_kind")
    kind = kinds[choice]
    if kind in ("path", "hub"):
        hint = "folder/or/file in the workspace" if kind == "path" else "org/name"
        text = st.text_input(f"{label}: {'path' if kind == 'path' else 'hub id'}",
                             value=current if kind_of(current, fixed) == kind else "", placeholder=hint,
                             key=f"{key}_text")
        if kind == "path":
            workspace_caption()
        return text.strip(), kind == "path"
    return (current if kind == "tiny" and current.startswith("tiny") else kind), False


def checked_source(chosen: str, current: str, local: bool, what: str) -> str:
    """A changed source as the engine may read it (local paths only inside the workspace)."""
    return current if chosen == current else app_source(chosen, what, local=local)


st.title("Model & data")
s = state.settings()
left, right = st.columns(2)
with left:
    st.subheader("Model")
    source, model_local = choose_source("Model source", MODEL_KINDS, s.model_source, ("default",), "model")
    dtype = st.selectbox("dtype", list(DTYPES), index=list(DTYPES).index(s.dtype), key="model_dtype")
    device = st.selectbox("Device", list(DEVICES), index=list(DEVICES).index(s.device), key="model_device",
                          help="auto = CUDA when available, else CPU")
with right:
    st.subheader("Data")
    data_source, data_local = choose_source("Data source", DATA_KINDS, s.data_source, ("default", "chatterbot"),
                                            "data")
    c1, c2, c3, c4 = st.columns(4)
    n_calib = c1.number_input("calib", 1, 100_000, s.n_calib, key="data_calib", help="calibration examples")
    n_val = c2.number_input("val", 0, 100_000, s.n_val, key="data_val",
                            help="an extra held-out side of the split (the refit holds out part of calib itself)")
    n_eval = c3.number_input("eval", 1, 1_000_000, s.n_eval, key="data_eval", help="evaluation examples")
    seed = c4.number_input("seed", 0, 2**31 - 1, s.seed, key="data_seed", help="decides each example's side")
    max_len = st.number_input("max tokens per example", 16, 32_768, s.max_len, step=64, key="data_maxlen")

chosen = replace(s, model_source=typed_or_current(source, s.model_source), dtype=dtype, device=device,
                 data_source=typed_or_current(data_source, s.data_source), n_calib=int(n_calib), n_val=int(n_val),
                 n_eval=int(n_eval), seed=int(seed), max_len=int(max_len))
if chosen != s:
    if st.button("Apply", type="primary", key="apply_settings"):
        try:  # local paths must lie in the workspace; the last good settings stay until they do
            checked = replace(chosen, model_source=checked_source(chosen.model_source, s.model_source, model_local,
                                                                  "model source"),
                              data_source=checked_source(chosen.data_source, s.data_source, data_local,
                                                         "data source"))
        except ValueError as e:
            st.error(f"Not applied: {e}")
        else:
            state.set_settings(checked)
            st.rerun()
    st.caption("Changes take effect when you press **Apply**.")

st.divider()


def draw_map(linears: list, name: str) -> None:
    st.subheader(f"Architecture map — {name}")
    df = pd.DataFrame([li.row() for li in linears])
    total = sum(li.params for li in linears if not li.tied)
    by_group = df.groupby("group", sort=False)["params"].sum()
    cols = st.columns(len(by_group) + 1)
    cols[0].metric("linears", f"{len(linears)}", help="compressible nn.Linear modules")
    for col, (group, n) in zip(cols[1:], by_group.items()):
        col.metric(f"{group} weights", f"{n:,}", help=f"{n / max(total, 1):.1%} of linear weights")
    st.dataframe(df[["name", "layer", "group", "module", "shape", "params", "break_even_rank", "bias", "tied"]],
                 hide_index=True, height=320, key="archmap")


lm = cache.current_model(s)
if lm is not None:
    draw_map(cache.linears(lm), lm.name)
else:
    try:  # a config alone still gives the map (and the Budget page's accounting)
        draw_map(cache.config_linears(s.model_source)[1], f"{s.model_source} (config only)")
    except ValueError:
        st.info("The architecture map appears once a model (or at least its config) can be read.")

st.divider()
st.subheader("Data split and the teacher's answer loss")
try:
    split = cache.data_split(s)
except ValueError as e:
    st.error(f"Data {s.data_source!r}: {e}")
    stop_page()
info = split.info
st.write(f"Split `{info.fingerprint}` of `{info.source}` (seed {info.seed}): "
         f"calib **{len(split.calib)}**, val **{len(split.val)}**, eval **{len(split.eval)}** examples — "
         "disjoint by content hash.")
if split.eval:
    with st.expander("First evaluation example"):
        ex = split.eval[0]
        st.text(f"system: {ex.system[:500]}\n\nuser: {ex.user[:1000]}\n\nanswer: {ex.answer[:1000]}")
if lm is not None:
    key = (lm.fingerprint, info.fingerprint, len(split.eval), s.max_len)
    result = cache.cached("teacher_eval", key)
    if result is None and st.button(f"Score the teacher on {len(split.eval)} eval examples", key="score_teacher"):
        result = cache.memo("teacher_eval", key, lambda: run_with_status(
            "Scoring the teacher", lambda p: evaluate(
                lm.model, lm.tokenizer, split.eval, batch_size=default_batch_size(lm.device),
                max_len=s.max_len, progress=p)), max_entries=16)
    if result is not None:
        c1, c2, c3, c4 = st.columns(4)
        c1.metric("teacher answer loss", f"{result.loss:.4f}")
        c2.metric("perplexity", f"{result.perplexity:.3f}")
        c3.metric("answer tokens", f"{result.tokens:,}")
        c4.metric("seconds", f"{result.seconds:.1f}")
