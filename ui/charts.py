"""Plotly figures of the app. Inputs are plain lists/dicts/DataFrames; nothing here computes."""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

MODULE_COLORS = {"q_proj": "#4c78a8", "k_proj": "#72b7b2", "v_proj": "#54a24b", "o_proj": "#eeca3b",
                 "gate_proj": "#f58518", "up_proj": "#e45756", "down_proj": "#b279a2", "lm_head": "#9d755d"}


PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#7f7f7f", "#bcbd22"]


def spectrum_figure(curves: dict[str, Sequence[float]], energies: dict[str, Sequence[float]],
                    rank: Optional[int], break_even: Optional[int], title: str) -> go.Figure:
    """Singular values (log y, left) and cumulative energy (right, 0-1) per curve name; rank markers."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("singular values (log scale)", "cumulative energy"))
    for i, (name, values) in enumerate(curves.items()):
        x = list(range(1, len(values) + 1))
        color = PALETTE[i % len(PALETTE)]
        dash = "dot" if "aware" not in name and len(curves) > 1 else "solid"
        line = dict(color=color, dash=dash)
        fig.add_trace(go.Scatter(x=x, y=list(values), mode="lines", name=name, legendgroup=name, line=line), 1, 1)
        if name in energies:
            fig.add_trace(go.Scatter(x=x, y=list(energies[name]), mode="lines", name=name, legendgroup=name,
                                     showlegend=False, line=line), 1, 2)
    # decades only on the log axis (no "2, 5" minor labels); ranks start at 1
    fig.update_yaxes(type="log", dtick=1, exponentformat="power", showexponent="all", minor=dict(showgrid=False),
                     title_text="singular value / the largest", row=1, col=1)
    fig.update_yaxes(range=[0, 1.02], tickformat=".0%", title_text="energy kept up to rank i", row=1, col=2)
    longest = max((len(v) for v in curves.values()), default=1)
    fig.update_xaxes(title_text="index i (rank)", range=[1, max(longest, 2)])
    markers = [(rank, "rank", dict(color="crimson", dash="dash"), "top right"),
               (break_even, "break-even", dict(color="gray", dash="dot"), "bottom right")]
    for value, label, style, where in markers:
        if not value:
            continue
        fig.add_vline(x=value, line=style, row=1, col=1, annotation_text=f"{label} {value}",
                      annotation_position=where)
        fig.add_vline(x=value, line=style, row=1, col=2)
    fig.update_layout(title=title, height=430, margin=dict(t=70, b=40, l=40, r=20),
                      legend=dict(orientation="h", y=-0.18))
    return fig


def rank_heatmap(table: pd.DataFrame, energy: float, basis: str) -> go.Figure:
    """``table``: index = layer, columns = module, values = rank needed for ``energy``."""
    z = table.values.tolist()
    fig = go.Figure(go.Heatmap(z=z, x=list(table.columns), y=[str(i) for i in table.index],
                               colorscale="Viridis", text=z, texttemplate="%{text}",
                               colorbar=dict(title="rank")))
    fig.update_layout(title=f"rank needed for {energy:.0%} of the {basis} energy", height=max(300, 22 * len(table) + 120),
                      xaxis_title="module", yaxis_title="layer", yaxis=dict(autorange="reversed", type="category"),
                      margin=dict(t=60, b=40, l=40, r=20))
    return fig


def error_bars(rows: Sequence[dict], value: str = "rel_error") -> go.Figure:
    """Per-matrix relative output error (a fraction, drawn as percent), one bar per matrix, coloured by module."""
    df = pd.DataFrame(rows)
    fig = go.Figure()
    for module, part in df.groupby("module", sort=False):
        fig.add_trace(go.Bar(x=part["name"].str.replace("model.layers.", "L", regex=False), y=part[value],
                             name=module, marker_color=MODULE_COLORS.get(module),
                             hovertemplate="%{x}: %{y:.3%}<extra></extra>"))
    tokens = "fit" if value == "rel_error_fit" else "held-out"
    fig.update_layout(title=f"relative output error per matrix ({tokens} calibration tokens)", barmode="group",
                      xaxis_title=f"matrix ({len(df)}: L<layer>.<module>)",
                      yaxis_title="relative output error ‖ΔW Xᵀ‖² / ‖W Xᵀ‖²", height=380,
                      margin=dict(t=50, b=40, l=60, r=20), xaxis=dict(showticklabels=len(df) <= 60),
                      yaxis=dict(tickformat=".1%"))
    return fig


def line_chart(series: dict[str, Sequence[float]], title: str, x_title: str, y_title: str, log: bool = False,
               x: Optional[Sequence] = None) -> go.Figure:
    """One line per series over ``x`` (default 0..n-1, integer ticks); the x axis spans exactly the data
    (layers 0..L-1, not -1..L); a log y axis labels decades only (10⁻², 10⁻¹, ...)."""
    fig = go.Figure()
    xs_all = []
    for name, values in series.items():
        xs = list(x) if x is not None else list(range(len(values)))
        xs_all += xs[: len(values)]
        fig.add_trace(go.Scatter(x=xs, y=list(values), mode="lines+markers", name=name))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, height=340,
                      margin=dict(t=50, b=40, l=40, r=20), xaxis=dict(tickformat="d"))
    if len(set(xs_all)) > 1 and all(isinstance(v, numbers.Real) for v in xs_all):
        fig.update_xaxes(range=[min(xs_all), max(xs_all)])
    if max((len(v) for v in series.values()), default=0) <= 32:
        fig.update_xaxes(dtick=1)
    if log:
        fig.update_yaxes(type="log", dtick=1, exponentformat="power")
    return fig


def refit_figure(curve: dict, title: str, what: str = "refit") -> go.Figure:
    """Training curve (refit or healing): train per step, valid at its evaluation steps (log y)."""
    fig = go.Figure()
    train = curve.get("train", [])
    fig.add_trace(go.Scatter(x=list(range(1, len(train) + 1)), y=train, mode="lines", name="train"))
    valid = curve.get("valid", [])
    steps = curve.get("eval_steps") or list(range(len(valid)))
    fig.add_trace(go.Scatter(x=steps[: len(valid)], y=valid, mode="lines+markers", name="valid"))
    if curve.get("best_step") is not None:
        fig.add_vline(x=curve["best_step"], line=dict(color="gray", dash="dot"), annotation_text="best")
    fig.update_layout(title=f"{what} loss — {title}", xaxis_title="step", yaxis_title="loss", height=340,
                      margin=dict(t=50, b=40, l=40, r=20))
    fig.update_yaxes(type="log")
    return fig


def pareto_figure(rows: Sequence[dict], teacher_loss: float, budget: Optional[float] = None,
                  target_kept: Optional[float] = None, found: Optional[int] = None, chosen: Optional[int] = None,
                  evaluation: Optional[tuple[float, float]] = None) -> go.Figure:
    """Answer loss against the share of parameters kept along the greedy path (an allocation's Pareto rows):
    the predicted validation loss (line), the measured one at verified points (markers), the teacher's
    validation loss and the budget (horizontal lines), a parameter target (vertical line), the found and
    the chosen points (by their ``steps``), and ``evaluation`` = (teacher, found student) losses on the
    evaluation side: other examples, hence their own series."""
    by_steps = {r["steps"]: r for r in rows}
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[r["kept"] for r in rows], y=[r["predicted_loss"] for r in rows], mode="lines",
                             name="predicted validation loss", line=dict(color=PALETTE[0])))
    verified = [r for r in rows if r["verified"]]
    fig.add_trace(go.Scatter(x=[r["kept"] for r in verified], y=[r["val_loss"] for r in verified], mode="markers",
                             name="measured validation loss", marker=dict(color=PALETTE[1], size=9)))
    points = (("found", found, "star", PALETTE[3]), ("chosen", chosen, "circle-open", "black"))
    for label, steps, symbol, color in points:
        row = by_steps.get(steps)
        if row is not None:
            y = row["val_loss"] if row["verified"] else row["predicted_loss"]
            fig.add_trace(go.Scatter(x=[row["kept"]], y=[y], mode="markers", name=f"{label} point",
                                     marker=dict(symbol=symbol, size=16, color=color, line=dict(width=2))))
    if evaluation is not None and found in by_steps and 0 in by_steps:
        fig.add_trace(go.Scatter(x=[by_steps[0]["kept"], by_steps[found]["kept"]], y=list(evaluation),
                                 mode="markers+text", text=["teacher", "found"], textposition="top center",
                                 name="evaluation loss", marker=dict(symbol="diamond", size=11, color=PALETTE[2])))
    fig.add_hline(y=teacher_loss, line=dict(color="gray", dash="dot"), annotation_text="teacher (validation)",
                  annotation_position="bottom left")
    if budget is not None:
        fig.add_hline(y=teacher_loss + budget, line=dict(color="crimson", dash="dash"),
                      annotation_text=f"budget +{budget:.4f} nats", annotation_position="top left")
    if target_kept is not None:
        fig.add_vline(x=target_kept, line=dict(color="crimson", dash="dash"), annotation_text="parameter target")
    fig.update_layout(title="loss along the greedy path (Pareto curve)",
                      xaxis_title="parameters kept (of the original)", yaxis_title="answer loss (nats/token)", height=440, margin=dict(t=50, b=40, l=40, r=20),
                      legend=dict(orientation="h", y=-0.2))
    fig.update_xaxes(tickformat=".0%")
    return fig
