"""Model & data: choose the model and the data split; architecture map and the teacher's answer loss."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
import streamlit as st

from lowrank_core import stats
from lowrank_core.evaluate import default_batch_size, iter_loss_estimates
from lowrank_core.models import DEVICES, DTYPES
from lowrank_core.progress import Cancelled
from lowrank_core.workspace import app_source
from ui import cache, jobs, state
from ui.entry import ensure_app, stop_page
from ui.paths import typed_or_current, workspace_caption
from ui.progress import POLL_SECONDS, job_status

ensure_app()

TEACHER_JOB_KEY = "lowrank_pending_teacher"  # jobs.BackgroundJob scoring the teacher now
ESTIMATES_KEY = "lowrank_teacher_estimates"  # {teacher_eval key: the last LossEstimate (stopped or complete)}

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
                 hide_index=True, height=320, key="linears")


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


def teacher_job(lm, examples: list, max_len: int, key: tuple) -> jobs.BackgroundJob:
    """Score the teacher in the background, in the split's order; ``info["latest"]["estimate"]`` holds the
    running estimate after every batch. A stop request ends it with that estimate marked ``stopped``."""
    latest: dict = {}

    def work(progress):
        try:
            for estimate in iter_loss_estimates(lm.model, lm.tokenizer, examples, max_len=max_len,
                                                batch_size=default_batch_size(lm.device)):
                latest["estimate"] = estimate
                progress(estimate.examples, estimate.total, estimate.describe("teacher loss"), stage="teacher",
                         metrics={"loss": estimate.loss, "half_width": estimate.half_width})
        except Cancelled:
            latest["estimate"] = replace(latest["estimate"], stopped=True)
        return latest["estimate"]

    return jobs.BackgroundJob("teacher", work, ckey=key, latest=latest)


def draw_score(loss: float, perplexity: float, tokens: int, examples: str, estimate=None) -> None:
    c = st.columns(5)
    c[0].metric("teacher answer loss", f"{loss:.4f}", help="token-weighted mean cross-entropy, nats")
    half = estimate.half_width if estimate is not None else None
    c[1].metric(f"{estimate.level:.0%} interval" if estimate is not None else "interval",
                f"± {half:.4f}" if half is not None and half < float("inf") else "—",
                help=f"t interval (N − 1 df) of the token-weighted mean, delta-method SE with examples resampled; "
                     f"shown from N ≥ {stats.MIN_LOSS_INTERVAL_N}, where its coverage holds (docs/statistics.md)")
    c[2].metric("perplexity", f"{perplexity:.3f}")
    c[3].metric("answer tokens", f"{tokens:,}")
    c[4].metric("examples", examples)


@st.fragment(run_every=POLL_SECONDS)
def teacher_progress(job) -> None:
    """The running estimate with its interval, the time left and a Stop button; full rerun at the end."""
    with job_status(job, "Scoring the teacher", "encoding the first example…"):
        estimate = job.info["latest"].get("estimate")
        if estimate is not None:
            draw_score(estimate.loss, estimate.perplexity, estimate.tokens,
                       f"{estimate.examples:,} of {estimate.total:,}", estimate)
        if st.button("Stop and keep the estimate", key="teacher_stop", disabled=job.stop_requested):
            job.request_stop()
        st.caption("Runs in the background, in the split's order: the figure sharpens as examples come in; "
                   "stopping keeps the estimate so far.")


def finish_teacher(job) -> None:
    """File a finished scoring run: its last estimate, and (complete runs only) the cached EvalResult."""
    st.session_state.pop(TEACHER_JOB_KEY, None)
    if job.error is not None:
        st.session_state["teacher_error"] = job.failure("Scoring the teacher")
        return
    estimate = job.result
    st.session_state.setdefault(ESTIMATES_KEY, {})[job.info["ckey"]] = estimate
    if not estimate.stopped:
        cache.memo("teacher_eval", job.info["ckey"], estimate.result, max_entries=16)


if lm is not None:
    key = (lm.fingerprint, info.fingerprint, len(split.eval), s.max_len)
    pending = st.session_state.get(TEACHER_JOB_KEY)
    if pending is not None and pending.finished:
        finish_teacher(pending)
        pending = None
    if "teacher_error" in st.session_state:
        st.error(st.session_state.pop("teacher_error"))
    result = cache.cached("teacher_eval", key)
    estimate = st.session_state.get(ESTIMATES_KEY, {}).get(key)
    if pending is not None:
        teacher_progress(pending)
    elif result is None:
        again = " again" if estimate is not None else ""
        if st.button(f"Score the teacher{again} on {len(split.eval)} eval examples", key="score_teacher",
                     help="runs in the background; the first estimate shows after a few examples and sharpens "
                          f"as more come; its interval from N ≥ {stats.MIN_LOSS_INTERVAL_N}, where its coverage "
                          "holds"):
            st.session_state[TEACHER_JOB_KEY] = teacher_job(lm, split.eval, s.max_len, key)
            st.rerun()
    if pending is None and result is not None:
        complete = estimate if estimate is not None and not estimate.stopped else None
        draw_score(result.loss, result.perplexity, result.tokens, f"{result.examples:,}", complete)
        st.caption(f"Scored in {result.seconds:.1f} s"
                   + (f": {complete.describe('teacher loss')}." if complete is not None else "."))
    elif pending is None and estimate is not None:
        draw_score(estimate.loss, estimate.perplexity, estimate.tokens,
                   f"{estimate.examples:,} of {estimate.total:,}", estimate)
        st.warning(f"Stopped after {estimate.examples:,} of {estimate.total:,} examples: "
                   f"{estimate.describe('teacher loss')} — a partial estimate, not cached for the other pages.")
