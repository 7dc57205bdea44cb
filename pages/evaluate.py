"""Evaluate: the paired proof — teacher and student on the same held-out examples, with a verdict; answers
side by side; the runs table."""
from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from lowrank_core import evaluate as evaluate_mod
from lowrank_core import stats
from lowrank_core.compare import CompareSettings
from lowrank_core.job import evaluate_job
from lowrank_core.generate import side_by_side
from ui import cache, jobs, proof, state
from ui.entry import ensure_app, stop_page
from ui.progress import POLL_SECONDS, job_status, run_with_status

ensure_app()

COMPARE_JOB_KEY = "lowrank_pending_compare"  # jobs.BackgroundJob of the comparison running now
COMPARISONS_KEY = "lowrank_comparisons"      # {(job key, split fingerprint, n, max_len, until decided): Comparison}
ANSWERS_KEY = "lowrank_answers"              # {(job key, k, max_new_tokens, seed): [SideBySide]}
RUN_COLUMNS = ["run", "time", "plan", "method", "of_original", "eval_examples", "teacher_loss", "student_loss",
               "delta", "delta_lo", "delta_hi", "verdict", "kl", "top1", "teacher_ppl", "student_ppl", "params_after",
               "calib", "data", "seed", "split", "mean_rel_error", "max_rel_error", "seconds", "job", "model"]


@st.fragment(run_every=POLL_SECONDS)
def compare_progress(job) -> None:
    """Progress of the running comparison (its running Δ ± half-width), a Stop button; full rerun at the end."""
    with job_status(job, "Comparing teacher and student", "encoding the first batch…"):
        series = job.series("compare")
        if series:
            st.plotly_chart(proof.live_chart(series), key="eval_live")
        if st.button("Stop and keep what is scored", key="compare_stop", disabled=job.stop_requested):
            job.request_stop()
        st.caption("Runs in the background: other pages stay usable. Stopping keeps every example scored so far.")


def finish(pending) -> None:
    st.session_state.pop(COMPARE_JOB_KEY, None)
    if pending.error is not None:
        st.session_state["compare_error"] = f"Comparison failed: {type(pending.error).__name__}: {pending.error}"
        return
    comparison = pending.result  # evaluate_job kept it on the job (unless stopped before any example)
    if comparison.examples == 0:
        st.session_state["compare_error"] = "Stopped before any example was scored: nothing to show."
        return
    st.session_state.setdefault(COMPARISONS_KEY, {})[pending.info["ckey"]] = comparison
    jobs.record_eval(pending.key, comparison)


def report(comparison, chosen: str) -> None:
    summary = comparison.summary()
    proof.verdict(summary)
    seq = summary["sequential"]
    st.caption(f"Procedure: {summary['procedure']} — " + (
        f"decided after {summary['stopping_n']:,} examples" if summary["decided"] and seq else
        "undecided at the maximum" if seq else f"fixed N = {summary['examples']:,}")
        + (f" ({len(seq['looks'])} planned looks at N = {', '.join(map(str, seq['looks']))}, α = {seq['alpha']})"
           if seq else ""))
    m = st.columns(3) + st.columns(3)  # two rows: an interval or "a → b" needs the width
    m[0].metric("Δ loss (student − teacher)", f"{summary['delta']:+.4f}", help="nats per answer token")
    m[1].metric(f"{summary['ci_level']:.0%} interval", stats.interval_text(summary["delta_ci"]),
                help=f"{summary['interval_method']}, examples resampled; shown from N ≥ {summary['min_interval_n']}")
    m[2].metric("p (Δ = 0)", stats.p_text(summary["p_value"]), help="two-sided paired t-test (N − 1 df)")
    m[3].metric("KL(teacher ‖ student)", f"{summary['kl']:.4f}", help="mean per answer token, nats")
    m[4].metric("top-1 agreement", f"{summary['top1_agreement']:.1%}", help="answer tokens where both argmaxes agree")
    m[5].metric("perplexity teacher → student", f"{summary['teacher_perplexity']:.3f} → "
                f"{summary['student_perplexity']:.3f}")
    st.caption(f"{summary['examples']:,} examples, {summary['tokens']:,} answer tokens"
               + (f"; {summary['skipped']} skipped because the prompt alone filled the {comparison.settings.max_len} "
                  "tokens" if summary["skipped"] else "") + f"; scored in {summary['seconds']:.0f} s.")
    rows = comparison.rows()
    c1, c2 = st.columns(2)
    c1.plotly_chart(proof.delta_histogram([r["delta"] for r in rows], summary), key="eval_hist")
    c2.plotly_chart(proof.loss_scatter(rows), key="eval_scatter")
    path = comparison.interval_path()
    st.plotly_chart(proof.interval_chart(path, summary), key="eval_path")
    st.markdown("**Where the student loses most** (Δ summed over the example's answer tokens)")
    st.dataframe(pd.DataFrame(summary["worst"])[["delta", "delta_per_token", "tokens", "prompt"]], hide_index=True,
                 key="eval_worst", column_config={"delta": st.column_config.NumberColumn("Δ nats", format="%+.3f"),
                                                   "delta_per_token": st.column_config.NumberColumn("Δ/token",
                                                                                                    format="%+.4f")})
    d1, d2 = st.columns(2)
    record = {"run": jobs.run_label(chosen), "settings": comparison.settings.__dict__, **summary, "interval_path": path}
    d1.download_button("Download the report (JSON)", json.dumps(record, indent=2, default=str),
                       file_name="lowrank-comparison.json", mime="application/json", key="eval_json")
    d2.download_button("Download per-example rows (CSV)", pd.DataFrame(rows).to_csv(index=False),
                       file_name="lowrank-comparison.csv", mime="text/csv", key="eval_csv")


def answers(lm, split, job, chosen: str) -> None:
    st.subheader("Answers side by side")
    c1, c2, c3, c4 = st.columns([1, 1, 1, 2])
    k = int(c1.number_input("Prompts", 1, min(8, len(split.eval)), min(3, len(split.eval)), key="answers_k"))
    tokens = int(c2.number_input("New tokens", 4, 512, 48, key="answers_tokens"))
    seed = int(c3.number_input("Sampling seed", 0, 2**31 - 1, 0, key="answers_seed"))
    akey = (chosen, k, tokens, seed)
    stored = st.session_state.setdefault(ANSWERS_KEY, {})
    c4.caption("Greedy and sampled (temperature 0.7, top-p 0.9, same seed for both models) answers to the first "
               "evaluation prompts; the text from the first diverging token on is highlighted.")
    if akey not in stored and c4.button(f"Generate answers for {k} prompts", key="answers_go"):
        stored[akey] = run_with_status(
            f"Generating {2 * k} answers per model",
            lambda p: side_by_side(lm.model, job.student, lm.tokenizer, split.eval, k=k, max_new_tokens=tokens,
                                   seed=seed, progress=p))
    if akey in stored:
        proof.side_by_side(stored[akey])


st.title("Evaluate")
s = state.settings()
lm = cache.require_model(s)
split = cache.data_split(s)
results = state.results()
key, _ = state.current_result()
keys = jobs.keys_for(lm.fingerprint)
pending = st.session_state.get(COMPARE_JOB_KEY)

if pending is not None and pending.finished:
    finish(pending)
    st.rerun()
if not keys:
    st.info("Compress a model on the **Compress** page first; every run of this session is listed here.")
else:
    key = key if key in keys else keys[-1]
    chosen = jobs.choose_run("Student", keys, key, key="eval_run")
    job = results[chosen]
    st.caption("The proof that teacher and student lose the same: both score the same held-out examples (never "
               "seen by calibration), per-example losses are paired, and the difference gets an interval and an "
               "equivalence verdict at the margin you set.")
    c1, c2, c3, c4 = st.columns([1, 1, 1, 2])
    held_out = job.split.eval  # the evaluation side of the split the student was compressed on
    n = int(c1.number_input("Evaluation examples (at most)", 1, len(held_out), len(held_out), key="eval_n",
                            help="the first N of the split's eval side; with 'stop when decided' the maximum"))
    until_decided = st.checkbox("Stop when decided", True, key="eval_until_decided",
                                help=f"{stats.PROCEDURE}: looks from N = {stats.MIN_INTERVAL_N} on, error rates "
                                     "that hold after stopping (docs/statistics.md)")
    margin = c2.text_input("Equivalence margin", CompareSettings.margin, key="eval_margin",
                           help="nats (0.02) or percent of the teacher's loss (1%)")
    batch_size = int(c3.number_input("Batch size", 1, 256, evaluate_mod.default_batch_size(lm.device),
                                     key="eval_batch", help="examples per forward pass (on CPU 1 is fastest)"))
    try:
        stats.parse_margin(margin, 1.0)
    except ValueError as e:
        st.error(str(e))
        stop_page()
    if "compare_error" in st.session_state:
        st.error(st.session_state.pop("compare_error"))
    ckey = (chosen, job.split.info.fingerprint, n, s.max_len, until_decided)
    comparison = st.session_state.get(COMPARISONS_KEY, {}).get(ckey)
    if pending is not None:
        compare_progress(pending)
    elif c4.button(f"Compare on up to {n} examples" if until_decided else f"Compare on {n} examples",
                   type="primary", key="eval_go",
                   help="scores teacher and student together; a result stays until the student is gone"):
        st.session_state[COMPARE_JOB_KEY] = jobs.BackgroundJob(
            chosen, lambda p: evaluate_job(job, n, batch_size, progress=p, margin=margin, max_len=s.max_len,
                                   until_decided=until_decided),
            ckey=ckey)
        st.rerun()
    if comparison is not None:
        judged = comparison.judged(margin)
        if judged.settings.margin != comparison.settings.margin:
            job.keep_comparison(judged)  # the export carries the verdict at the margin shown
            jobs.record_eval(chosen, judged)
        report(judged, chosen)
        answers(lm, split, job, chosen)

st.subheader("Runs of this session")
runs = state.runs()
if not runs:
    st.caption("No runs yet.")
else:
    df = pd.DataFrame(runs)
    df = df[[c for c in RUN_COLUMNS if c in df.columns] + [c for c in df.columns if c not in RUN_COLUMNS]]
    fmt = st.column_config.NumberColumn
    st.dataframe(df, hide_index=True, key="runs_table", column_config={
        "of_original": fmt(format="percent"), "params_before": fmt(format="localized"),
        "params_after": fmt(format="localized"), "teacher_loss": fmt(format="%.4f"), "student_loss": fmt(format="%.4f"),
        "delta": fmt(format="%+.4f"), "delta_lo": fmt(format="%+.4f"), "delta_hi": fmt(format="%+.4f"),
        "top1": fmt(format="percent"), "kl": fmt(format="%.4f")})
    st.download_button("Download runs as CSV", df.to_csv(index=False), file_name="lowrank-runs.csv",
                       mime="text/csv", key="runs_csv")
