"""What the Evaluate page draws of a paired comparison: figures, the verdict, answers side by side.

Inputs are the engine's plain results (``Comparison.summary()`` / ``rows()`` / ``interval_path()`` and
``generate.SideBySide``); nothing here computes a statistic.
"""
from __future__ import annotations

import html
import math
from typing import Sequence

import plotly.graph_objects as go
import streamlit as st

from lowrank_core.stats import interval_text

VERDICT_STYLE = {"equivalent": st.success, "not equivalent": st.error, "inconclusive": st.warning}


def delta_histogram(deltas: Sequence[float], summary: dict) -> go.Figure:
    """Per-example Δ (student − teacher mean answer loss, nats/token) with the token-weighted Δ, its
    interval and the ±margin band."""
    fig = go.Figure(go.Histogram(x=list(deltas), nbinsx=60, name="examples", marker_color="#4c78a8"))
    fig.add_vrect(x0=-summary["margin"], x1=summary["margin"], fillcolor="#2ca02c", opacity=0.12, line_width=0,
                  annotation_text="± margin", annotation_position="top left")
    if summary["delta_ci"] is not None:  # None below the N where the interval's coverage holds
        lo, hi = summary["delta_ci"]
        fig.add_vrect(x0=lo, x1=hi, fillcolor="#d62728", opacity=0.25, line_width=0)
    fig.add_vline(x=summary["delta"], line=dict(color="#d62728", width=2),
                  annotation_text=f"Δ {summary['delta']:+.4f} {interval_text(summary['delta_ci'])}",
                  annotation_position="top right")
    fig.update_layout(title="per-example Δloss (token-weighted Δ and its interval in red)", height=360,
                      xaxis_title="student − teacher loss of the example (nats/token)", yaxis_title="examples",
                      margin=dict(t=60, b=50, l=50, r=20), showlegend=False)
    return fig


def loss_scatter(rows: Sequence[dict]) -> go.Figure:
    """Teacher vs student mean answer loss per example (point size ~ answer tokens), with y = x."""
    t = [r["teacher_loss"] for r in rows]
    s = [r["student_loss"] for r in rows]
    lo, hi = (min(t + s), max(t + s)) if rows else (0.0, 1.0)
    pad = 0.05 * (hi - lo) or 0.05
    lo, hi = lo - pad, hi + pad
    sizes = [4 + min(12, r["tokens"] / 40) for r in rows]
    fig = go.Figure(go.Scatter(x=t, y=s, mode="markers", marker=dict(size=sizes, opacity=0.55, color="#4c78a8"),
                               text=[f"{r['tokens']} tokens" for r in rows], name="examples"))
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(color="gray", dash="dot"),
                             name="student = teacher"))
    fig.update_layout(title="teacher vs student loss per example", height=360,
                      xaxis=dict(title="teacher (nats/token)", range=[lo, hi]),
                      yaxis=dict(title="student (nats/token)", range=[lo, hi]), margin=dict(t=60, b=50, l=50, r=20),
                      legend=dict(orientation="h", y=-0.2))
    return fig


def interval_chart(path: Sequence[dict], summary: dict) -> go.Figure:
    """Δ and its interval on the first n examples, n growing (log x), against the ±margin band."""
    n = [r["examples"] for r in path]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=n + n[::-1], y=[r["hi"] for r in path] + [r["lo"] for r in path][::-1],
                             fill="toself", fillcolor="rgba(214,39,40,0.18)", line=dict(width=0),
                             name=f"{summary['ci_level']:.0%} interval"))
    fig.add_trace(go.Scatter(x=n, y=[r["delta"] for r in path], mode="lines+markers", line=dict(color="#d62728"),
                             name="Δloss"))
    seq = summary.get("sequential")
    if seq and seq["path"]:  # the group-sequential looks: Δ̂ ± c·SE, what the stopping rule read
        looks = seq["path"]
        fig.add_trace(go.Scatter(x=[r["examples"] for r in looks], y=[r["delta"] for r in looks], mode="markers",
                                 marker=dict(color="#9467bd", size=9, symbol="diamond"), name="looks (Δ̂ ± c·SE)",
                                 error_y=dict(type="data", symmetric=False, array=[r["hi"] - r["delta"] for r in looks],
                                              arrayminus=[r["delta"] - r["lo"] for r in looks])))
    for y, label in ((summary["margin"], "+ margin"), (-summary["margin"], "− margin"), (0.0, "")):
        fig.add_hline(y=y, line=dict(color="#2ca02c" if label else "gray", dash="dot"), annotation_text=label)
    fig.update_layout(title="the interval narrows as examples accumulate", height=360,
                      xaxis=dict(type="log", title="evaluation examples scored"),
                      yaxis_title="Δloss (nats/token)", margin=dict(t=60, b=50, l=60, r=20),
                      legend=dict(orientation="h", y=-0.25))
    return fig


def live_chart(series: Sequence[tuple], level: float = 0.95) -> go.Figure:
    """The running Δ of a comparison as it is scored (``BackgroundJob.series("compare")``: (done, metrics)),
    its interval where one is shown, and the boundary the estimate has to cross at the next look: inside
    ±``equivalent_within`` decides equivalent, beyond ±``not_equivalent_beyond`` not equivalent."""
    rows = [(done, m) for done, m in series if "delta" in m]
    x = [done for done, _ in rows]
    fig = go.Figure()
    shown = [(done, m) for done, m in rows if math.isfinite(m.get("half_width", math.inf))]
    if shown:
        sx = [d for d, _ in shown]
        fig.add_trace(go.Scatter(x=sx + sx[::-1], y=[m["delta"] + m["half_width"] for _, m in shown]
                                 + [m["delta"] - m["half_width"] for _, m in shown][::-1], fill="toself",
                                 fillcolor="rgba(214,39,40,0.15)", line=dict(width=0), name=f"{level:.0%} interval"))
    fig.add_trace(go.Scatter(x=x, y=[m["delta"] for _, m in rows], mode="lines+markers", line=dict(color="#d62728"),
                             name="Δloss so far"))
    bound = [(done, m) for done, m in rows if "equivalent_within" in m]
    if bound:
        bx = [d for d, _ in bound]
        for key, name, color in (("equivalent_within", "equivalent if |Δ| inside", "#2ca02c"),
                                 ("not_equivalent_beyond", "not equivalent if |Δ| beyond", "#ff7f0e")):
            for sign in (1, -1):
                fig.add_trace(go.Scatter(x=bx, y=[sign * m[key] for _, m in bound], mode="lines",
                                         line=dict(color=color, dash="dash"), name=name, showlegend=sign == 1,
                                         legendgroup=key))
        margin = bound[-1][1]["margin"]
        for y in (margin, -margin):
            fig.add_hline(y=y, line=dict(color="gray", dash="dot"))
    fig.update_layout(title="live: Δloss and the boundary of the next look", height=320,
                      xaxis_title="examples scored", yaxis_title="Δloss (nats/token)",
                      margin=dict(t=50, b=40, l=60, r=20), legend=dict(orientation="h", y=-0.3))
    return fig


def verdict(summary: dict) -> None:
    """The verdict sentence, coloured by the verdict."""
    text = summary["verdict_text"]
    if summary.get("stopped"):
        text += " (stopped early: these are the examples scored until then)"
    VERDICT_STYLE[summary["verdict"]](text)


def _answer_html(common: str, rest: str) -> str:
    return ('<div style="white-space:pre-wrap;font-family:monospace;font-size:0.85rem">'
            f'{html.escape(common)}<mark style="background:#ffd8a8">{html.escape(rest)}</mark></div>')


def side_by_side(rows: Sequence) -> None:
    """Each prompt's two answers in two columns; from the first diverging token on, highlighted."""
    for i, r in enumerate(rows):
        with st.container(border=True):
            where = "identical answers" if r.diverge is None else f"first different token: #{r.diverge + 1}"
            prompt = r.prompt if len(r.prompt) <= 300 else r.prompt[:299] + "…"
            st.markdown(f"**{r.mode}** · {where}")
            st.text(prompt)
            left, right = st.columns(2)
            left.caption(f"teacher · {r.teacher_tokens} tokens")
            left.markdown(_answer_html(r.common, r.teacher_rest), unsafe_allow_html=True)
            right.caption(f"student · {r.student_tokens} tokens")
            right.markdown(_answer_html(r.common, r.student_rest), unsafe_allow_html=True)
