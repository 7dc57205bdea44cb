"""The sidebar every page shows: loaded model, device, dtype, data split sizes, current plan."""
from __future__ import annotations

import streamlit as st
import torch

from lowrank_core.models import device_description

from . import cache, state
from .jobs import run_label

PLAN_ERROR_KEY = "lowrank_plan_error"  # the Budget page's rule error, while its rules have one


def draw_sidebar(box) -> None:
    """Fill ``box`` (a sidebar container) from the cached model and split; never loads anything."""
    s = state.settings()
    box.markdown("#### Loaded model")
    lm = cache.cached_model(s)
    if lm is None:
        box.caption(f"`{s.model_source}` — not loaded yet")
    else:
        params = sum(p.numel() for p in {id(p): p for p in lm.model.parameters()}.values())
        box.markdown(f"**{lm.name}**  \n{params:,} parameters  \nfingerprint `{lm.fingerprint}`")
    box.markdown(f"**Device** {device_description(torch.device(lm.device if lm else _device(s.device)))}  \n"
                 f"**dtype** {s.dtype}")
    box.markdown("#### Data")
    split = cache.cached("split", cache.split_key(s))
    if split is None:
        box.caption(f"`{s.data_source}` — asked: calib {s.n_calib}, val {s.n_val}, eval {s.n_eval}, seed {s.seed}")
    else:
        c = split.info.counts
        box.markdown(f"`{s.data_source}` seed {s.seed}  \ncalib **{c.get('calib', 0)}** · val **{c.get('val', 0)}** · "
                     f"eval **{c.get('eval', 0)}**  \nsplit `{split.info.fingerprint}`")
    plan, error = state.stored_plan(), st.session_state.get(PLAN_ERROR_KEY)
    if plan is not None or error:
        box.markdown("#### Plan")
    if error:
        kept = f"; the last valid plan ({len(plan['plan'].rules)} rule(s)) is kept" if plan is not None else ""
        box.error(f"The Budget page's plan has an error: {error}{kept}")
    elif plan is not None:
        box.caption(f"{len(plan['plan'].rules)} rule(s) from {plan['source']}")
    if state.JOB_KEY in st.session_state:
        box.caption("A compression is running in the background (see **Compress**).")
    if state.SEARCH_JOB_KEY in st.session_state:
        box.caption("A rank-allocation search is running in the background (see **Search**).")
    key, _ = state.current_result()
    if key is not None:
        box.markdown("#### Current student")
        box.caption(run_label(key))


def _device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice
