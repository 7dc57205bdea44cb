"""What the Evaluate page draws of a paired comparison: figures, the verdict, answers side by side.

Inputs are the engine's plain results (``Comparison.summary()`` / ``rows()`` / ``interval_path()`` and
``generate.SideBySide``); nothing here computes a statistic.
"""
from __future__ import annotations

import html
from typing import Sequence

import plotly.graph_objects as go
import streamlit as st

VERDICT_STYLE = {"equivalent": st.success, "not equivalent": st.error, "inconclusive": st.warning}


def delta_histogram(deltas: Sequence[float], summary: dict) -> go.Figure:
    """Per-example Δ (student − teacher mean answer loss, nats/token) with the token-weighted Δ, its
    interval and the ±margin band."""
    fig = go.Figure(go.Histogram(x=list(deltas), nbinsx=60, name="examples", marker_color="#4c78a8"))
    lo, hi = summary["delta_ci"]
    fig.add_vrect(x0=-summary["margin"], x1=summary["margin"], fillcolor="#2ca02c", opacity=0.12, line_width=0,
                  annotation_text="± margin", annotation_position="top left")
    fig.add_vrect(x0=lo, x1=hi, fillcolor="#d62728", opacity=0.25, line_width=0)
    fig.add_vline(x=summary["delta"], line=dict(color="#d62728", width=2),
                  annotation_text=f"Δ {summary['delta']:+.4f} [{lo:+.4f}, {hi:+.4f}]", annotation_position="top right")
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
    for y, label in ((summary["margin"], "+ margin"), (-summary["margin"], "− margin"), (0.0, "")):
        fig.add_hline(y=y, line=dict(color="#2ca02c" if label else "gray", dash="dot"), annotation_text=label)
    fig.update_layout(title="the interval narrows as examples accumulate", height=360,
                      xaxis=dict(type="log", title="evaluation examples scored"),
                      yaxis_title="Δloss (nats/token)", margin=dict(t=60, b=50, l=60, r=20),
                      legend=dict(orientation="h", y=-0.25))
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
