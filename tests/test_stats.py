"""Intervals and the stopping rule of stats.py, checked by simulation on per-example rows resampled from real
rows of the embedded model (tests/fixtures/per_example_rows.csv, written by ``compare --per-example``).

Every simulation is vectorised numpy with a fixed seed (a few seconds each). The coverage table and the
error rates printed here are the ones docs/statistics.md reports."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from lowrank_core import stats

ROWS = Path(__file__).resolve().parent / "fixtures" / "per_example_rows.csv"
SIZES = (5, 10, 20, 50, 200)
FLOOR = 0.93  # coverage a nominal 95 % interval must reach wherever it is shown


def real_rows() -> dict:
    """{"tokens", "teacher", "diff"} per example, every student of the file pooled (each row is one
    example's answer tokens, Σ teacher CE and Σ student − teacher CE)."""
    with open(ROWS, newline="") as f:
        rows = list(csv.DictReader(f))
    tokens = np.array([float(r["tokens"]) for r in rows])
    teacher = np.array([float(r["teacher_sum"]) for r in rows])
    student = np.array([float(r["student_sum"]) for r in rows])
    return {"tokens": tokens, "teacher": teacher, "diff": student - teacher}


def heavy_tailed_rows(n: int = 400, seed: int = 0) -> dict:
    """A synthetic stand-in with a heavier tail than the real rows (8 % of examples lose up to 17 extra nats
    on top of a lognormal-length answer's noise): what the mechanics tests resample."""
    rng = np.random.default_rng(seed)
    tokens = np.clip(np.round(rng.lognormal(4.0, 0.9, n)), 2, 500)
    teacher = tokens * rng.gamma(2.0, 0.8, n)
    diff = tokens * rng.normal(0.05, 0.08, n) + (rng.random(n) < 0.08) * np.minimum(rng.exponential(5.0, n), 17)
    return {"tokens": tokens, "teacher": teacher, "diff": diff}


@pytest.fixture(scope="module")
def rows() -> dict:
    """The real rows (the simulations the thresholds and error rates come from)."""
    if not ROWS.is_file():
        pytest.skip(f"{ROWS.name} (real per-example rows of the embedded model) is not in tests/fixtures yet")
    return real_rows()


@pytest.fixture(scope="module")
def synthetic() -> dict:
    return heavy_tailed_rows()


def design(rows: dict, max_n: int = 200, k: float = 3.5) -> float:
    """A margin the fixed-N design at ``max_n`` decides 'equivalent' at Δ = 0 with ~90 % power:
    k · σ / √N_max, σ the per-example SD of the linearised ratio (d − Δ·n) / n̄."""
    n, d = rows["tokens"], rows["diff"]
    resid = d - d.sum() / n.sum() * n
    return k * float(np.sqrt((resid ** 2).mean()) / n.mean()) / math.sqrt(max_n)


def test_the_rows_are_skewed(rows):
    """What makes normal-theory intervals undercover on these rows: strongly right-skewed per-example sums
    (skewness > 1 for Δ and for the teacher's loss), whatever the per-token spread."""
    def skew(x):
        return float(((x - x.mean()) ** 3).mean() / x.std() ** 3)
    assert len(rows["diff"]) >= 100 and skew(rows["diff"]) > 1.0 and skew(rows["teacher"]) > 1.0


# ----------------------------------------------------------------------------- quantiles and boundaries
def test_t_quantiles_and_distribution_function():
    for p, df, q in ((0.975, 4, 2.776445), (0.975, 19, 2.093024), (0.95, 9, 1.833113), (0.995, 2, 9.924843)):
        assert stats.t_quantile(p, df) == pytest.approx(q, abs=2e-6)
        assert stats.t_cdf(q, df) == pytest.approx(p, abs=1e-7)
    assert stats.t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)


def test_spending_boundaries_match_published_obrien_fleming_values():
    # Lan–DeMets O'Brien–Fleming-type spending, 5 equally spaced looks, one-sided α = 0.025 (gsDesign sfLDOF)
    published = (4.8769, 3.3569, 2.6803, 2.2898, 2.0310)
    got = stats.spending_boundaries((0.2, 0.4, 0.6, 0.8, 1.0), 0.025)
    assert got == pytest.approx(published, abs=0.015)
    assert all(g >= p - 0.002 for g, p in zip(got, published))  # any grid error is on the conservative side
    assert stats.spending_boundaries((1.0,), 0.05) == pytest.approx((1.644854,), abs=1e-4)


def test_planned_looks_start_where_an_interval_is_shown():
    assert stats.planned_looks(200, 5) == [40, 80, 120, 160, 200]
    assert stats.MIN_INTERVAL_N == 30 and stats.planned_looks(50, 5) == [30, 40, 50]  # none before MIN_INTERVAL_N
    assert stats.planned_looks(7, 5) == [7]
    with pytest.raises(ValueError, match="looks"):
        stats.planned_looks(10, 0)


# ----------------------------------------------------------------------------- fixed-N intervals
def test_interval_coverage_holds_wherever_it_is_shown(rows):
    """The t interval's coverage of the token-weighted Δ and of the teacher's mean loss, at N = 5 … 200
    (20,000 resampled comparisons each): ≥ 93 % at every N from the statistic's threshold on
    (``MIN_INTERVAL_N`` for Δ, ``MIN_LOSS_INTERVAL_N`` for one model's loss); below it coverage fails, so no
    interval is shown there."""
    sizes = (5, 10, 20, 30, 50, 100, 200)
    table, minimum = {}, {"delta": stats.MIN_INTERVAL_N, "teacher": stats.MIN_LOSS_INTERVAL_N}
    for what, values in (("delta", rows["diff"]), ("teacher", rows["teacher"])):
        table[what] = stats.simulate_coverage(rows["tokens"], values, sizes, trials=20000, seed=7)
    print("\ncoverage of the 95% t interval:", table)
    for what, cover in table.items():
        for size, rate in cover.items():
            if size >= minimum[what]:
                assert rate >= FLOOR, (what, size, rate)
        below = [s for s in sizes if s < minimum[what]]
        assert below and cover[below[-1]] < FLOOR, (what, cover)  # the threshold is needed: no lower one holds


def test_no_interval_p_value_or_verdict_below_the_threshold(synthetic):
    rows = synthetic
    n, d = rows["tokens"][:7], rows["diff"][:7]
    test = stats.paired_test(n, d, margin=1e6)
    assert test.ci is None and test.tost_ci is None and test.p_value is None and test.verdict == "inconclusive"
    assert f"N ≥ {stats.MIN_INTERVAL_N}" in test.interval_note and test.more_examples >= stats.MIN_INTERVAL_N - 7
    assert "No verdict below N = " in stats.verdict_sentence(test, 2.0)
    n, d = rows["tokens"][:stats.MIN_INTERVAL_N], rows["diff"][:stats.MIN_INTERVAL_N]
    shown = stats.paired_test(n, d, margin=1e6)
    half = stats.t_quantile(0.975, stats.MIN_INTERVAL_N - 1) * stats.ratio_se(n, d)
    assert shown.ci == pytest.approx((shown.delta - half, shown.delta + half)) and shown.verdict == "equivalent"
    assert math.isinf(stats.t_half_width(0.1, stats.MIN_INTERVAL_N - 1, 0.95))


# ----------------------------------------------------------------------------- stopping when decided
@pytest.mark.xfail(strict=True, reason="measured on the real rows: false 'equivalent' at Δ = +margin is 0.056 "
                   "(4,000 comparisons; SE 0.004), above α = 0.05: the t-scale boundaries with Hall's skewness "
                   "term are still anti-conservative under this skew at the last look (open: issue 22)")
def test_group_sequential_error_rates_survive_the_stopping(rows):
    """2,000+ simulated comparisons per case: false 'equivalent' at Δ = ±margin ≤ α, false 'not
    equivalent' at Δ = 0 ≤ α, and the mean stopping N at Δ = 0 well below the fixed-N design's N_max."""
    alpha, max_n = 0.05, 200
    margin = design(rows, max_n)
    n, d = rows["tokens"], rows["diff"]
    cases = {f"Δ = {sign:+d}·margin": stats.simulate_sequential(n, d, sign * margin, margin, max_n, alpha,
                                                                 trials=4000, seed=2 + i)
             for i, sign in enumerate((1, -1))}
    cases["Δ = 0"] = stats.simulate_sequential(n, d, 0.0, margin, max_n, alpha, trials=4000, seed=4)
    print(f"\nmargin {margin:.4f} nats/token, N_max {max_n}:", cases)
    for name in ("Δ = +1·margin", "Δ = -1·margin"):
        assert cases[name]["equivalent"] <= alpha, (name, cases[name])
    assert cases["Δ = 0"]["not_equivalent"] <= alpha
    assert cases["Δ = 0"]["equivalent"] >= 0.8  # the design decides
    assert cases["Δ = 0"]["mean_stopping_n"] <= 0.8 * max_n


def test_peeking_without_spending_inflates_false_equivalence(rows):
    """The check above can fail: reading the fixed 90 % t interval at every example from N = 20 on and
    stopping when it is inside the margin declares a student at Δ = margin equivalent far more often than α."""
    alpha, max_n, trials = 0.05, 200, 2000
    margin = design(rows, max_n)
    n, d = rows["tokens"], rows["diff"]
    d = d - (d.sum() / n.sum() - margin) * n
    rng = np.random.default_rng(5)
    idx = rng.integers(0, len(n), size=(trials, max_n))
    tn, td = n[idx], d[idx]
    cn, cd, cnn, cnd, cdd = (np.cumsum(a, axis=1) for a in (tn, td, tn * tn, tn * td, td * td))
    k = np.arange(1, max_n + 1)
    r = cd / cn
    se = np.sqrt(k / np.maximum(k - 1, 1) * np.maximum(0, cdd - 2 * r * cnd + r * r * cnn)) / cn
    q = np.array([stats.t_quantile(1 - alpha, max(j - 1, 1)) for j in k])
    inside = (r + q * se < margin) & (r - q * se > -margin) & (k >= stats.MIN_INTERVAL_N)
    assert inside.any(axis=1).mean() > 2 * alpha


def test_monitor_and_the_vectorised_simulation_agree(synthetic):
    """The live monitor (running sums, one example at a time) decides as the simulation's arrays do."""
    rng = np.random.default_rng(6)
    rows = synthetic
    margin, max_n = design(rows), 200
    n = rows["tokens"]
    d = rows["diff"] - rows["diff"].sum() / n.sum() * n + 0.5 * margin * n  # true Δ = margin / 2: both verdicts
    idx = rng.integers(0, len(n), size=(60, max_n))
    verdict, stop = stats.sequential_paths(n[idx], d[idx], margin, max_n)
    names = {0: "inconclusive", 1: "equivalent", 2: "not equivalent"}
    for trial in range(len(idx)):
        seq = stats.sequential_test(n[idx[trial]], d[idx[trial]], margin, max_n=max_n)
        assert (seq.verdict, seq.stopping_n) == (names[int(verdict[trial])], int(stop[trial])), trial
    assert 0 < (verdict == 1).sum() < len(idx)


def test_no_look_decides_below_the_interval_threshold():
    monitor = stats.SequentialMonitor(10.0, 7)  # a huge margin: any shown interval would be inside it
    for k in range(7):
        monitor.add(10.0, 0.01 * k)
    assert monitor.looks == [7] and not monitor.decided and monitor.result().describe() == (
        "undecided at the maximum of 7 examples")
    verdict, _ = stats.sequential_paths(np.full((3, 7), 10.0), np.zeros((3, 7)) + 0.01, 10.0, 7)
    assert not verdict.any()


def test_monitor_boundary_is_what_the_estimate_must_cross():
    rng = np.random.default_rng(7)
    monitor = stats.SequentialMonitor(0.05, 100, looks=5)
    assert monitor.looks == [40, 60, 80, 100] and monitor.boundary() is None  # none before N = 30; no SE yet
    for _ in range(10):
        monitor.add(float(rng.integers(5, 50)), float(rng.normal(0, 1)))
    b = monitor.boundary()
    assert b["look_examples"] == 40 and b["equivalent_within"] < 0.05 < b["not_equivalent_beyond"]
    assert b["margin"] == 0.05 and b["c"] == pytest.approx(stats.look_boundary(monitor.boundaries[0], 40))
    with pytest.raises(ValueError, match="margin"):
        stats.SequentialMonitor("lots", 100)
