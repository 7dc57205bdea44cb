"""Search: per-matrix ranks under a loss budget (or a parameter target), verified on validation examples;
the Pareto curve of the greedy path, and any of its points opened as a plan on the Compress page."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from lowrank_core import allocate as alloc
from lowrank_core import search_job, stats
from ui import cache, charts, proof, state
from ui import search as app_search
from ui.entry import ensure_app, stop_page
from ui.jobs import BackgroundJob
from ui.progress import POLL_SECONDS, job_status

ensure_app()
FORM_KEY = "lowrank_search_form"    # the last submitted choices: the widgets' defaults on every visit
ERROR_KEY = "lowrank_search_error"
GOALS = ("Loss budget", "Parameter target")
DEFAULT_VAL = search_job.DEFAULT_VAL  # as `search --val`
_S = alloc.SearchSettings()         # engine defaults
PROBE_HELP = ("layer: one decoder-suffix pass per layer (cheap); matrix: one per matrix; gradient: one backward "
              "pass per validation example scores every singular component")


@st.fragment(run_every=POLL_SECONDS)
def search_progress(job) -> None:
    """Progress of the running search, redrawn every POLL_SECONDS; a full rerun once it has finished."""
    with job_status(job, f"Searching: {job.info['goal']}", "reading the calibration examples…"):
        if st.button("Stop", key="search_stop", disabled=job.stop_requested):
            job.request_stop()
        st.caption("Runs in the background: other pages stay usable and nothing restarts it.")


def point_label(row: dict, found: int) -> str:
    loss = f"validation {row['val_loss']:.4f}" if row["verified"] else f"predicted {row['predicted_loss']:.4f}"
    mark = " · found" if row["steps"] == found else ""
    return f"{row['steps']} steps · {row['kept']:.1%} of parameters · {loss}{mark}"


st.title("Search")
st.caption("Rank allocation: each matrix's exact output error at every rank and its measured sensitivity give a "
           "greedy path from the dense model (most parameters saved per predicted loss first); the prefix that "
           "meets the budget is verified with real forward passes on validation examples. Any point of the path "
           "opens as a plan on the **Compress** page.")
s = state.settings()
lm = cache.require_model(s)
split = cache.data_split(s)
pending = st.session_state.get(state.SEARCH_JOB_KEY)
if pending is not None and pending.finished:
    st.session_state.pop(state.SEARCH_JOB_KEY, None)
    if pending.error is not None:
        st.session_state[ERROR_KEY] = pending.failure("Search")
    else:
        found = pending.result  # search_job.SearchResult
        cache.memo("teacher_eval", pending.info["teacher_key"], lambda: found.evaluation["teacher"], max_entries=16)
        state.store_search(found.allocation, found.evaluation, lm.name, lm.fingerprint, pending.info["goal"],
                           comparison=found.comparison)
    st.rerun()
if pending is not None:
    search_progress(pending)
    stop_page()

v = st.session_state.setdefault(FORM_KEY, dict(goal=GOALS[0], budget="1%", keep=0.8, probe=_S.probe,
                                               val=s.n_val or DEFAULT_VAL, calib=len(split.calib),
                                               max_verify=_S.max_verify, eval=len(split.eval)))
c1, c2 = st.columns([1, 2])
goal = c1.radio("Search for", GOALS, index=GOALS.index(v["goal"]), horizontal=True, key="search_goal")
if goal == GOALS[0]:
    budget_text = c2.text_input("Loss budget", value=v["budget"], key="search_budget",
                                help="allowed rise of the validation loss: a percent of the teacher's loss ('1%') "
                                     "or nats (0.02)")
    keep = v["keep"]
else:
    keep = c2.number_input("Keep this fraction of the decoder linears' parameters", 0.01, 1.0, float(v["keep"]),
                           step=0.05, key="search_keep", help="the embedding, the head and the norms stay whole")
    budget_text = v["budget"]
c1, c2, c3, c4, c5 = st.columns(5)
probe = c1.selectbox("Probe", alloc.PROBES, index=alloc.PROBES.index(v["probe"]), key="search_probe",
                     help=PROBE_HELP)
n_val = c2.number_input("Validation examples", 1, 10_000, int(v["val"]), key="search_val",
                        help="the budget is verified on these: the split's validation side, never calibration "
                             "or evaluation examples")
n_calib = c3.number_input("Calibration examples", 1, max(1, len(split.calib)), min(int(v["calib"]), len(split.calib)),
                          key="search_calib", help="the first N of the split's calib side (Grams and spectra)")
max_verify = c4.number_input("Max verify passes", 1, 64, int(v["max_verify"]), key="search_max_verify",
                             help="validation forward passes spent bisecting the greedy path to the budget")
n_eval = c5.number_input("Evaluation examples", 1, max(1, len(split.eval)), min(int(v["eval"]), len(split.eval)),
                         key="search_eval", help="teacher and found student are scored on the first N of the "
                                                 "evaluation side once the search is done")
st.caption(f"Validation examples come from the validation side of this session's split (seed {s.seed}: sides by "
           "content hash, disjoint from calibration and evaluation), so the budget is checked on text the plan "
           f"was not fitted on and the evaluation side is touched only by the final score. The Model & data "
           f"page's *val* size ({s.n_val}) need not be set: the first N validation-side examples that fit "
           f"{min(_S.val_max_len, s.max_len)} tokens are read (as `search --val N`); calibration and evaluation "
           "examples stay those of every other page. Compress the found plan with the same calibration "
           "examples (method whitened) to rebuild the student measured here.")
if ERROR_KEY in st.session_state:
    st.error(st.session_state.pop(ERROR_KEY))

if st.button("Search", type="primary", key="search_go"):
    v.update(goal=goal, budget=budget_text, keep=float(keep), probe=probe, val=int(n_val), calib=int(n_calib),
             max_verify=int(max_verify), eval=int(n_eval))
    try:
        spec = app_search.search_spec(s, budget=budget_text if goal == GOALS[0] else None,
                                      keep=float(keep) if goal == GOALS[1] else None, probe=probe, val=int(n_val),
                                      calib=int(n_calib), max_verify=int(max_verify), eval=int(n_eval))
        budget, target = spec.validate(lm.model)  # the goal too, before any work
        search_split = app_search.search_split(s, spec)
        search_job.validation_examples(spec, lm.tokenizer, search_split)
    except ValueError as e:
        st.error(f"Cannot search: {e}")
    else:
        label = f"budget {budget}" if target is None else f"keep {float(keep):.0%} of the decoder linears"
        teacher_key = (lm.fingerprint, split.info.fingerprint, int(n_eval), s.max_len)
        st.session_state[state.SEARCH_JOB_KEY] = BackgroundJob(
            "search", lambda p: search_job.run_search(spec, p, loaded=lm, split=search_split), goal=label,
            teacher_key=teacher_key)
        st.rerun()

found = state.search_result()
if found is None:
    st.info("No search yet in this session: choose a budget (or a parameter target) and press **Search**.")
    stop_page()
r, t, u = found["result"], found["evaluation"]["teacher"], found["evaluation"]["student"]
paired = found["comparison"].summary()  # the paired comparison on the evaluation examples
st.subheader(f"Search {found['run']}: {found['goal']} — {found['model']}")
if found["fingerprint"] != lm.fingerprint:
    st.warning(f"This search ran on {found['model']} (`{found['fingerprint']}`), not on the model loaded now.")
c1, c2, c3, c4, c5 = st.columns(5)
c1.metric("parameters after", f"{r.params_after:,}", delta=f"{-r.removed:,}", delta_color="inverse")
c2.metric("of the original", f"{r.params_after / r.params_before:.2%}")
c3.metric("validation Δloss", f"{r.val_loss - r.teacher_loss:+.4f}",
          help=f"budget {r.budget:.4f} nats" if r.budget is not None else f"target {r.target_params:,} parameters")
c4.metric("evaluation Δloss", f"{paired['delta']:+.4f}", help=f"student − teacher, paired on {u.examples} "
                                                              "evaluation examples (nats per answer token)")
c5.metric(f"{paired['ci_level']:.0%} interval", stats.interval_text(paired["delta_ci"]),
          help=f"t interval over examples ({paired.get('interval_method', '')}); shown from N ≥ "
               f"{stats.MIN_INTERVAL_N}")
proof.verdict(paired)
st.caption(f"{len(r.ranks)} matrices factorised at {r.steps} of {r.path_length} greedy steps · validation loss: "
           f"teacher {r.teacher_loss:.4f}, found {r.val_loss:.4f} on {r.val_examples} examples ({r.val_tokens:,} "
           f"answer tokens) · evaluation loss: teacher {t.loss:.4f}, found {u.loss:.4f} on {u.examples} examples "
           f"({u.tokens:,} answer tokens; KL {paired['kl']:.4f}, top-1 agreement {paired['top1_agreement']:.1%}) · "
           f"{len(r.verified)} verify passes · " + " · ".join(f"{k} {sec:.1f} s" for k, sec in r.timings.items()))

chart = st.container()
st.dataframe(pd.DataFrame(r.pareto), hide_index=True, key="search_table", column_config={
    "params": st.column_config.NumberColumn(format="localized"),
    "removed": st.column_config.NumberColumn(format="localized"),
    "kept": st.column_config.NumberColumn(format="percent"),
    "predicted_loss": st.column_config.NumberColumn(format="%.4f"),
    "val_loss": st.column_config.NumberColumn(format="%.4f")})
with st.expander("Per-matrix ranks and sensitivities of the found plan"):
    st.dataframe(pd.DataFrame(r.matrices), hide_index=True, key="search_matrices")

st.subheader("Open a point as a plan")
rows = {row["steps"]: row for row in r.pareto}
steps = list(rows)
k = st.selectbox("Point of the greedy path", steps, index=steps.index(r.steps) if r.steps in steps else 0,
                 format_func=lambda j: point_label(rows[j], r.steps), key=f"search_point_{found['run']}")
target_kept = r.target_params / r.params_before if r.target_params is not None else None
chart.plotly_chart(charts.pareto_figure(r.pareto, r.teacher_loss, budget=r.budget, target_kept=target_kept,
                                        found=r.steps, chosen=k, evaluation=(t.loss, u.loss)), key="search_pareto")
plan = r.plan_at(k)
st.caption(f"{rows[k]['params']:,} parameters ({rows[k]['kept']:.2%} of the original), {len(r.ranks_at(k))} "
           f"matrices factorised, {len(plan.rules)} rules.")
with st.expander("Plan as YAML"):
    st.code(plan.to_yaml(), language="yaml")
if st.button("Open as plan on Compress page", type="primary", key="search_open"):
    state.store_plan(plan, f"Search page ({point_label(rows[k], r.steps)})")
    st.switch_page("pages/compress.py")
