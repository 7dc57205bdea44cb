"""Evaluate: teacher vs student answer loss and perplexity on N evaluation examples; the runs table."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from lowrank_core import evaluate as evaluate_mod
from ui import cache, charts, jobs, state
from ui.entry import ensure_app
from ui.progress import run_with_status

ensure_app()

st.title("Evaluate")
s = state.settings()
lm = cache.require_model(s)
split = cache.data_split(s)
results = state.results()
key, _ = state.current_result()
keys = jobs.keys_for(lm.fingerprint)

if not keys:
    st.info("Compress a model on the **Compress** page first; every run of this session is listed here.")
else:
    key = key if key in keys else keys[-1]
    chosen = jobs.choose_run("Student", keys, key, key="eval_run")
    result = results[chosen]
    c1, c2 = st.columns([1, 3])
    n = c1.number_input("Evaluation examples", 1, len(split.eval), len(split.eval), key="eval_n",
                        help="the first N of the split's eval side (never seen by calibration)")
    batch_size = c1.number_input("Batch size", 1, 256, evaluate_mod.default_batch_size(lm.device), key="eval_batch",
                                 help="examples per forward pass (on CPU 1 is fastest: padding is pure cost)")
    teacher_key = (lm.fingerprint, split.info.fingerprint, int(n), s.max_len)
    student_key = (chosen, split.info.fingerprint, int(n), s.max_len)
    scores = {"teacher": cache.cached("teacher_eval", teacher_key),
              "student": cache.cached("student_eval", student_key)}
    if (scores["teacher"] is None or scores["student"] is None) and c1.button(
            f"Evaluate on {int(n)} examples", type="primary", key="eval_go"):
        models = {name: m for name, m in (("teacher", lm.model), ("student", result.student))
                  if scores[name] is None}
        fresh = run_with_status(
            f"Scoring {' and '.join(models)} on {int(n)} eval examples",
            lambda p: evaluate_mod.evaluate_models(models, lm.tokenizer, split.eval[: int(n)],
                                                   batch_size=int(batch_size), max_len=s.max_len, progress=p))
        for name, value in fresh.items():
            cache.memo(f"{name}_eval", teacher_key if name == "teacher" else student_key, lambda v=value: v,
                       max_entries=32)
            scores[name] = value
    if scores["teacher"] is not None and scores["student"] is not None:
        t, u = scores["teacher"], scores["student"]
        jobs.record_eval(chosen, int(n), t, u)
        with c2:
            st.plotly_chart(charts.teacher_student_bars({"teacher": t, "student": u}), key="eval_bars")
        table = pd.DataFrame([{"model": "teacher", "loss": t.loss, "perplexity": t.perplexity, "tokens": t.tokens,
                               "examples": t.examples, "seconds": t.seconds},
                              {"model": "student", "loss": u.loss, "perplexity": u.perplexity, "tokens": u.tokens,
                               "examples": u.examples, "seconds": u.seconds}])
        st.dataframe(table, hide_index=True, key="eval_table",
                     column_config={"loss": st.column_config.NumberColumn(format="%.4f"),
                                    "perplexity": st.column_config.NumberColumn(format="%.4f")})
        d1, d2, d3 = st.columns(3)
        d1.metric("Δ loss (student − teacher)", f"{u.loss - t.loss:+.4f}")
        d2.metric("Δ perplexity", f"{u.perplexity - t.perplexity:+.4f}")
        d3.metric("student perplexity / teacher", f"{u.perplexity / t.perplexity:.4f}")
        verdict = "not worse than" if u.loss <= t.loss else "worse than"
        st.markdown(f"Student loss **{u.loss:.4f}** vs teacher **{t.loss:.4f}** "
                    f"({u.loss - t.loss:+.4f} nats/token): the student is **{verdict}** the teacher on these "
                    f"{u.examples} examples ({u.tokens:,} answer tokens).")
    elif scores["teacher"] is not None:
        c2.caption(f"Teacher already scored on these {int(n)} examples: loss {scores['teacher'].loss:.4f}.")

st.subheader("Runs of this session")
runs = state.runs()
if not runs:
    st.caption("No runs yet.")
else:
    df = pd.DataFrame(runs)
    st.dataframe(df, hide_index=True, key="runs_table", column_config={
        "of_original": st.column_config.NumberColumn(format="percent"),
        "params_before": st.column_config.NumberColumn(format="localized"),
        "params_after": st.column_config.NumberColumn(format="localized")})
    st.download_button("Download runs as CSV", df.to_csv(index=False), file_name="lowrank-runs.csv",
                       mime="text/csv", key="runs_csv")
