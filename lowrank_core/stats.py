"""Paired statistics of per-example answer-loss sums: the token-weighted Δ, its interval, tests, a verdict.

Inputs are per-example arrays over the same N examples: ``tokens[i]`` answer tokens and ``diff[i]`` =
Σ student CE − Σ teacher CE over them (nats). The estimate is the ratio Δ = Σ diff / Σ tokens (nats per
answer token, exactly the difference of the two token-weighted mean losses). Its uncertainty is got by
resampling *examples* (tokens of one example are not independent): the delta-method standard error of
the ratio with Student t quantiles (N − 1 df) for the interval, the t-test, the equivalence p-values and
the sample-size estimate; none of them is given below ``MIN_INTERVAL_N`` examples, where their coverage
fails on the heavy-tailed per-example differences (simulated on real rows: docs/statistics.md).
Equivalence at a margin m is two one-sided tests (TOST) at level α, decided by interval inclusion:
*equivalent* when the (1 − 2α) t interval lies inside (−m, m), *not equivalent* when it lies wholly outside
[−m, m], otherwise *inconclusive*. Stopping when decided is the group-sequential TOST below
(:class:`SequentialMonitor`, Lan–DeMets O'Brien–Fleming-type spending at planned looks).
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Union

import numpy as np

VERDICTS = ("equivalent", "not equivalent", "inconclusive")
_CELLS = 4_000_000  # bootstrap index cells drawn at once (reps × N): memory stays ~32 MB
# The fewest examples at which an interval of a ratio is shown. Below it the t interval's coverage fails the
# 93 %-for-95 % floor on per-example rows resampled from real rows of the embedded model
# (tests/fixtures/per_example_rows.csv: right-skewed per-example sums): see docs/statistics.md and
# tests/test_stats.py, which re-simulates both at N = 5 … 200.
MIN_INTERVAL_N = 30       # paired Δ: the t interval covers ≥ 93 % from here on (real rows, tests/test_stats.py)
MIN_LOSS_INTERVAL_N = 200  # one model's mean loss (more skewed than Δ): ≥ 93 % only from here on
INTERVAL_METHOD = "t (N−1 df), delta-method SE of the ratio"


def normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def normal_quantile(p: float) -> float:
    """Φ⁻¹(p) by bisection on ``normal_cdf`` (p in (0, 1)); exact to ~1e-12."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile probability {p!r} must be in (0, 1)")
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if normal_cdf(mid) < p else (lo, mid)
    return 0.5 * (lo + hi)


def _arrays(tokens, diff) -> tuple[np.ndarray, np.ndarray]:
    n, d = np.asarray(tokens, dtype=np.float64), np.asarray(diff, dtype=np.float64)
    if n.shape != d.shape or n.ndim != 1:
        raise ValueError(f"tokens {n.shape} and diff {d.shape} must be 1-D arrays of one length")
    if len(n) == 0 or n.sum() <= 0:
        raise ValueError("no answer tokens: nothing to compare")
    return n, d


def ratio(tokens, diff) -> float:
    """Σ diff / Σ tokens: the token-weighted Δ (nats per answer token)."""
    n, d = _arrays(tokens, diff)
    return float(d.sum() / n.sum())


def ratio_se(tokens, diff) -> float:
    """Delta-method standard error of ``ratio`` when examples are resampled (0 for one example)."""
    n, d = _arrays(tokens, diff)
    if len(n) < 2:
        return 0.0
    r = d.sum() / n.sum()
    resid = d - r * n
    return float(math.sqrt(len(n) / (len(n) - 1) * float((resid ** 2).sum())) / n.sum())


class RunningRatio:
    """Σ d / Σ n over examples added one at a time, with :func:`ratio_se` from five running sums, so a live
    estimate costs O(1) per example (the evaluation and comparison passes keep one)."""

    def __init__(self):
        self.count = 0
        self.n = self.d = self.nn = self.nd = self.dd = 0.0
        self.nnn = self.nnd = self.ndd = self.ddd = 0.0  # third moments: the skewness of the residuals

    def add(self, n: float, d: float) -> None:
        self.count += 1
        self.n += n
        self.d += d
        self.nn += n * n
        self.nd += n * d
        self.dd += d * d
        self.nnn += n * n * n
        self.nnd += n * n * d
        self.ndd += n * d * d
        self.ddd += d * d * d

    def sums(self) -> tuple:
        """The nine running sums :func:`look_bounds` reads."""
        return (self.n, self.d, self.nn, self.nd, self.dd, self.nnn, self.nnd, self.ndd, self.ddd)

    @property
    def ratio(self) -> float:
        return self.d / self.n if self.n > 0 else math.nan

    def se(self) -> float:
        """``ratio_se`` of the examples added so far (inf before two)."""
        if self.count < 2 or self.n <= 0:
            return math.inf
        r = self.d / self.n
        ss = max(0.0, self.dd - 2 * r * self.nd + r * r * self.nn)
        return math.sqrt(self.count / (self.count - 1) * ss) / self.n


def bootstrap_ratios(tokens, diff, reps: int = 2000, seed: int = 0) -> np.ndarray:
    """``reps`` paired bootstrap replicates of ``ratio`` (examples drawn with replacement), float64 [reps].
    Drawn in chunks of ≤ 4M indices, so memory does not grow with reps × N."""
    n, d = _arrays(tokens, diff)
    if int(reps) < 1:
        raise ValueError(f"bootstrap reps {reps!r} must be >= 1")
    rng = np.random.default_rng(seed)
    out = np.empty(int(reps))
    chunk = max(1, _CELLS // len(n))
    for start in range(0, int(reps), chunk):
        k = min(chunk, int(reps) - start)
        idx = rng.integers(0, len(n), size=(k, len(n)))
        out[start:start + k] = d[idx].sum(axis=1) / np.maximum(n[idx].sum(axis=1), 1e-300)
    return out


def percentile_interval(replicates: np.ndarray, level: float) -> tuple[float, float]:
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level {level!r} must be in (0, 1)")
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(replicates, [tail, 1.0 - tail])
    return float(lo), float(hi)


def loss_difference(value: Union[str, float], teacher_loss: float, what: str = "margin",
                    allow_zero: bool = False) -> float:
    """A loss difference in nats: ``"1%"`` = 1 % of ``teacher_loss``; ``0.02`` / ``"0.02"`` = 0.02 nats.
    ``what`` names it in errors (ValueError); it must be finite and > 0 (>= 0 with ``allow_zero``)."""
    text = str(value).strip()
    try:
        nats = float(text[:-1]) * teacher_loss / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError(f"bad {what} {value!r}; use nats (e.g. 0.02) or a percent of the teacher loss "
                         "(e.g. '1%')") from None
    if not math.isfinite(nats) or nats < 0 or (nats == 0 and not allow_zero):
        raise ValueError(f"{what} {value!r} must be a finite number {'>=' if allow_zero else '>'} 0 (nats or "
                         "percent of the teacher loss)")
    return nats


def parse_margin(margin: Union[str, float], teacher_loss: float) -> float:
    """Equivalence margin in nats (see :func:`loss_difference`; 0 is not a margin)."""
    return loss_difference(margin, teacher_loss, "margin")


@dataclass
class PairedTest:
    """Everything said about Δ = student − teacher loss (nats per answer token) on N paired examples.
    Below :data:`MIN_INTERVAL_N` examples no interval, p-value or verdict is given (``ci`` / ``tost_ci`` /
    ``p_value`` / ``tost_p`` are None, the verdict is inconclusive and ``interval_note`` says why)."""

    examples: int
    tokens: int
    delta: float
    se: float                      # delta-method standard error of delta
    ci: Optional[tuple]            # (lo, hi) t interval (N − 1 df) at ``level``
    level: float
    p_value: Optional[float]       # two-sided t-test of Δ = 0
    margin: float                  # nats
    alpha: float
    tost_ci: Optional[tuple]       # (lo, hi) t interval at 1 − 2α, the one the verdict reads
    tost_p: Optional[float]        # max of the two one-sided t p-values
    verdict: str                   # one of VERDICTS
    more_examples: Optional[int]   # inconclusive: about how many more examples would decide (Δ and SE/√N holding)
    interval_note: str = ""        # why no interval is shown ('' when one is)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ci"] = list(self.ci) if self.ci is not None else None
        d["tost_ci"] = list(self.tost_ci) if self.tost_ci is not None else None
        return d


def examples_to_decide(n: int, delta: float, se: float, margin: float, alpha: float) -> Optional[int]:
    """More examples after which the (1 − 2α) interval would clear ±margin if Δ and the per-example spread
    stay as measured (SE ∝ 1/√N); None when Δ sits on the margin or SE is 0."""
    gap = abs(abs(delta) - margin)
    if gap <= 0 or se <= 0 or not math.isfinite(se):
        return None
    z = normal_quantile(1.0 - alpha)
    needed = max(n * (z * se / gap) ** 2, MIN_INTERVAL_N)
    return max(1, int(math.ceil(needed - n)))


def t_interval(tokens, diff, level: float) -> Optional[tuple]:
    """The ``level`` t interval (N − 1 df, delta-method SE) of the ratio; None below :data:`MIN_INTERVAL_N`."""
    n, d = _arrays(tokens, diff)
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level {level!r} must be in (0, 1)")
    half = t_half_width(ratio_se(n, d), len(n), level)
    if not math.isfinite(half):
        return None
    r = ratio(n, d)
    return r - half, r + half


def paired_test(tokens: Sequence, diff: Sequence, margin: float, level: float = 0.95, alpha: float = 0.05,
                reps: int = 2000, seed: int = 0) -> PairedTest:
    """Δ, its t interval at ``level``, the t-test of Δ = 0 and the TOST verdict at ±``margin`` nats (all from
    :data:`MIN_INTERVAL_N` examples on). ``reps`` / ``seed`` are kept for callers; no bootstrap is drawn."""
    n, d = _arrays(tokens, diff)
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha {alpha!r} must be in (0, 0.5)")
    delta, se, size = ratio(n, d), ratio_se(n, d), len(n)
    ci, tost_ci = t_interval(n, d, level), t_interval(n, d, 1.0 - 2.0 * alpha)
    p_value = tost_p = None
    if ci is not None:
        if se > 0:
            p_value = 2.0 * (1.0 - t_cdf(abs(delta) / se, size - 1))
            tost_p = max(1.0 - t_cdf((delta + margin) / se, size - 1), t_cdf((delta - margin) / se, size - 1))
        else:
            p_value = 1.0 if delta == 0 else 0.0
            tost_p = 0.0 if abs(delta) < margin else 1.0
    if tost_ci is not None and -margin < tost_ci[0] and tost_ci[1] < margin:
        verdict, more = "equivalent", None
    elif tost_ci is not None and (tost_ci[0] > margin or tost_ci[1] < -margin):
        verdict, more = "not equivalent", None
    else:
        verdict, more = "inconclusive", examples_to_decide(size, delta, se, margin, alpha)
        if tost_ci is None:
            more = max(more or 0, MIN_INTERVAL_N - size)
    return PairedTest(examples=size, tokens=int(n.sum()), delta=delta, se=se, ci=ci, level=level,
                      p_value=p_value, margin=margin, alpha=alpha, tost_ci=tost_ci, tost_p=tost_p,
                      verdict=verdict, more_examples=more, interval_note=interval_note(size))


def verdict_sentence(test: PairedTest, teacher_loss: float, sequential: Optional["SequentialTest"] = None) -> str:
    """The verdict in one sentence, with Δ, its interval and the margin (and, for a sequential comparison,
    when it was decided)."""
    rel = f" ({test.margin / teacher_loss:.2%} of the teacher's loss)" if teacher_loss > 0 else ""
    shown = (f"{test.level:.0%} interval [{test.ci[0]:+.4f}, {test.ci[1]:+.4f}]" if test.ci is not None
             else f"no interval ({test.interval_note})")
    core = (f"Δloss {test.delta:+.4f} nats/token, {shown}, on {test.examples:,} examples "
            f"({test.tokens:,} answer tokens)")
    verdict, more_examples = test.verdict, test.more_examples
    if sequential is not None:
        verdict = sequential.verdict
        core += f"; {sequential.describe()} ({sequential.procedure})"
    if verdict == "equivalent":
        return (f"Equivalent: the student loses the same as the teacher within ±{test.margin:.4f} nats{rel} — "
                f"{core}.")
    if verdict == "not equivalent":
        side = "worse" if test.delta > 0 else "better"
        return f"Not equivalent: the student is {side} than the teacher by more than {test.margin:.4f} nats{rel} — {core}."
    if sequential is not None:
        return f"Inconclusive at ±{test.margin:.4f} nats{rel}: a larger maximum N is needed — {core}."
    if test.ci is None:
        return f"No verdict below N = {MIN_INTERVAL_N} at ±{test.margin:.4f} nats{rel} — {core}."
    more = (f"about {more_examples:,} more examples would decide if Δ holds"
            if more_examples else "more examples are needed")
    return f"Inconclusive at ±{test.margin:.4f} nats{rel}: {more} — {core}."


def interval_path(tokens: Sequence, diff: Sequence, level: float = 0.95, reps: int = 500, seed: int = 0,
                  start: int = MIN_INTERVAL_N, points: int = 12) -> list[dict]:
    """How the interval narrows as examples accumulate: rows {examples, delta, lo, hi} on the first n
    examples for ~``points`` geometrically spaced n from ``start`` (at least :data:`MIN_INTERVAL_N`: no
    interval is shown below) to N (in scoring order); empty below that. ``reps``/``seed``: unused."""
    n, d = _arrays(tokens, diff)
    total = len(n)
    start = max(int(start), MIN_INTERVAL_N)
    if total < start:
        return []
    sizes = sorted({min(total, int(round(v))) for v in np.geomspace(start, total, num=points)})
    rows = []
    for size in sizes:
        if n[:size].sum() <= 0:
            continue
        ci = t_interval(n[:size], d[:size], level)
        if ci is not None:
            rows.append({"examples": size, "delta": ratio(n[:size], d[:size]), "lo": ci[0], "hi": ci[1]})
    return rows


# ----------------------------------------------------------------------------- small-sample intervals


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(x: float, df: float) -> float:
    """Student t distribution function with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom {df!r} must be > 0")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + x * x))
    return 1.0 - tail if x >= 0 else tail


@functools.lru_cache(maxsize=4096)
def t_quantile(p: float, df: float) -> float:
    """Student t quantile (bisection on :func:`t_cdf`; exact to ~1e-10)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile probability {p!r} must be in (0, 1)")
    lo, hi = -1e3, 1e3
    for _ in range(120):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def interval_shown(examples, minimum: int = MIN_INTERVAL_N):
    """Whether an interval of a ratio over ``examples`` examples is shown (its coverage holds from
    ``minimum`` on: :data:`MIN_INTERVAL_N` for a paired Δ, :data:`MIN_LOSS_INTERVAL_N` for one model's loss)."""
    return examples >= minimum


def t_half_width(se: float, examples: int, level: float, minimum: int = MIN_INTERVAL_N) -> float:
    """Half-width of the ``level`` t interval (N − 1 df) with standard error ``se``; inf where no interval
    is shown (fewer than ``minimum`` examples, or no SE)."""
    if not interval_shown(examples, minimum) or not math.isfinite(se):
        return math.inf
    return t_quantile(0.5 + level / 2.0, examples - 1) * se


def interval_note(examples: int, minimum: int = MIN_INTERVAL_N) -> str:
    """Why no interval is shown yet ('' when one is)."""
    if interval_shown(examples, minimum):
        return ""
    return f"interval shown from N ≥ {minimum} (its coverage fails below that on skewed, heavy-tailed examples)"


# ----------------------------------------------------------------------------- stopping when decided
# Group-sequential TOST with Lan–DeMets O'Brien–Fleming-type alpha spending (Lan & DeMets 1983; Jennison &
# Turnbull 2000, ch. 7 and 9): at planned looks the repeated confidence interval Δ̂ ± c_k·SE_k (c_k the
# one-sided boundary spending α(t) = 2 − 2Φ(z_{1−α/2}/√t) of α at information fraction t = n_k / N_max) is
# compared with ±margin; the first look where it lies inside (−m, m) stops "equivalent", wholly outside
# [−m, m] stops "not equivalent"; otherwise the comparison goes on to N_max ("undecided at the maximum").
# Looks start at MIN_INTERVAL_N: the early boundaries are wide, which is where heavy tails bite.
PROCEDURE = "group-sequential TOST, Lan–DeMets O'Brien–Fleming-type alpha spending"
DEFAULT_LOOKS = 5


def obf_spent(t: float, alpha: float) -> float:
    """α spent by information fraction ``t`` (one-sided level ``alpha``): 2 − 2Φ(z_{1−α/2} / √t)."""
    if t <= 0:
        return 0.0
    return min(alpha, 2.0 - 2.0 * normal_cdf(normal_quantile(1.0 - alpha / 2.0) / math.sqrt(min(t, 1.0))))


def _phi(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


@functools.lru_cache(maxsize=256)
def spending_boundaries(fractions: tuple, alpha: float) -> tuple:
    """One-sided Z boundaries c_k at increasing information ``fractions`` (last 1) such that a standard
    Brownian motion's Z statistic first crosses c_k at look k with probability α(t_k) − α(t_{k−1})
    (:func:`obf_spent`): recursive numerical integration (Armitage, McPherson & Rowe 1969) on a grid."""
    t = [float(v) for v in fractions]
    if not t or any(b <= a for a, b in zip(t, t[1:])) or t[0] <= 0 or abs(t[-1] - 1.0) > 1e-12:
        raise ValueError(f"information fractions {fractions!r} must increase from > 0 to 1")
    h = 0.005
    grid = np.arange(-12.0, 12.0 + h / 2, h)  # the score S = Z √t (Brownian motion at t)
    bounds, spent = [], 0.0
    density = None
    prev_t = 0.0
    for tk in t:
        target = obf_spent(tk, alpha) - spent
        step = tk - prev_t
        if density is None:
            density = _phi(grid / math.sqrt(tk)) / math.sqrt(tk)
        else:
            kernel_x = np.arange(-8.0 * math.sqrt(step), 8.0 * math.sqrt(step) + h / 2, h)
            if len(kernel_x) < 3:
                kernel_x = np.array([-h, 0.0, h])
            kernel = _phi(kernel_x / math.sqrt(step)) / math.sqrt(step) * h
            density = np.convolve(density, kernel, mode="same")
        # crossing probability above b at this look, from the sub-density that has not stopped
        tail = np.cumsum((density * h)[::-1])[::-1] - 0.5 * density * h  # P(S ≥ grid point), trapezoid

        def crossed(b):
            return float(np.interp(b, grid, tail))
        if target <= 1e-15:
            b = grid[-1]
        else:
            lo, hi = -12.0, 12.0
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if crossed(mid) > target else (lo, mid)
            b = 0.5 * (lo + hi)
        spent += crossed(b)
        density = np.where(grid < b, density, 0.0)
        bounds.append(b / math.sqrt(tk))
        prev_t = tk
    return tuple(bounds)


def planned_looks(max_n: int, looks: int = DEFAULT_LOOKS, first: Optional[int] = None) -> list[int]:
    """Example counts of the looks: ``looks`` equally spaced counts up to ``max_n``, none before ``first``
    (default :data:`MIN_INTERVAL_N`); a single look at ``max_n`` when it is below ``first``."""
    first = MIN_INTERVAL_N if first is None else int(first)
    if int(max_n) < 1 or int(looks) < 1:
        raise ValueError(f"max N {max_n!r} and looks {looks!r} must be >= 1")
    max_n = int(max_n)
    counts = sorted({int(math.ceil(max_n * k / looks)) for k in range(1, int(looks) + 1)})
    counts = [c for c in counts if c >= first] or [max_n]
    if counts[-1] != max_n:
        counts.append(max_n)
    return counts


@dataclass
class SequentialTest:
    """The group-sequential TOST's result: decided (at a look) or undecided at the maximum."""

    procedure: str
    max_n: int
    looks: list                    # planned example counts
    boundaries: list               # c_k (Z) at each look
    alpha: float
    margin: float
    decided: bool
    verdict: str                   # one of VERDICTS ("inconclusive" when undecided)
    stopping_n: int                # examples at the deciding look (or scored, when undecided)
    look: Optional[int]            # index of the deciding look
    delta: float                   # Δ̂ at stopping_n
    rci: Optional[tuple]           # (lo, hi) the equivalence read at the last look reached (None before one)
    path: list                     # one row per look reached: {examples, delta, se, c, lo, hi}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rci"] = list(self.rci) if self.rci is not None else None
        return d

    def describe(self) -> str:
        if self.decided:
            return f"decided after {self.stopping_n:,} examples (look {self.look + 1} of {len(self.looks)})"
        if self.stopping_n >= self.max_n:
            return f"undecided at the maximum of {self.max_n:,} examples"
        return f"undecided after {self.stopping_n:,} of at most {self.max_n:,} examples"


def _finite(value: float) -> Optional[float]:
    """JSON-safe: None for inf / nan (a record is printed as strict JSON)."""
    return value if math.isfinite(value) else None


def _look_verdict(b: dict, margin: float) -> Optional[str]:
    if -margin < b["lo"] and b["hi"] < margin:
        return "equivalent"
    if b["worse"] > margin or b["better"] < -margin:
        return "not equivalent"
    return None


def look_boundary(c: float, examples: int) -> float:
    """The Z boundary ``c`` carried to the t scale at a look on ``examples`` examples (same one-sided tail
    probability, N − 1 df): the SE is estimated, and the heavy tails make it small often at small N."""
    if examples < 2:
        return math.inf
    return t_quantile(normal_cdf(c), examples - 1)


def _residual_moments(k: int, sums: tuple, mu):
    """(SE, skewness) of the ratio's residuals d − μ·n from the nine running sums (floats or arrays)."""
    n, d, nn, nd, dd, nnn, nnd, ndd, ddd = sums
    ss = np.maximum(0.0, dd - 2 * mu * nd + mu * mu * nn)
    s3 = ddd - 3 * mu * ndd + 3 * mu * mu * nnd - mu ** 3 * nnn
    se = np.sqrt(k / max(k - 1, 1) * ss) / n
    skew = np.where(ss > 0, (s3 / k) / np.maximum(ss / k, 1e-300) ** 1.5, 0.0)
    return se, skew


def look_bounds(k: int, sums: tuple, margin: float, c_z: float) -> dict:
    """The four bounds one look reads (floats, or arrays over simulated comparisons), from the running sums
    (Σn, Σd, Σn², Σnd, Σd², Σn³, Σn²d, Σnd², Σd³) of ``k`` examples and the look's Z boundary ``c_z``:

    - each one-sided test uses the SE of the ratio *under its null* (residuals d ∓ m·n: a score-type test,
      which a sample that has not met the heavy tail cannot make small), at the t-scaled boundary c, widened
      on the sample's long side by the Edgeworth term of the studentised mean, γ(2c² + 1) / (6√k)
      (Hall 1992, §3.5); never narrowed;
    - equivalent when ``hi`` < m and ``lo`` > −m; not equivalent when ``worse`` > m or ``better`` < −m."""
    c = look_boundary(c_z, k)
    term = (2 * c * c + 1) / (6 * math.sqrt(k)) if k >= 3 else 0.0
    r = sums[1] / sums[0]
    se_up, g_up = _residual_moments(k, sums, margin)     # null Δ = +m
    se_dn, g_dn = _residual_moments(k, sums, -margin)    # null Δ = −m
    return {"delta": r, "c": c,
            "hi": r + (c + np.maximum(0.0, g_up) * term) * se_up,
            "lo": r - (c + np.maximum(0.0, -g_dn) * term) * se_dn,
            "worse": r - (c + np.maximum(0.0, -g_up) * term) * se_up,
            "better": r + (c + np.maximum(0.0, g_dn) * term) * se_dn}


class SequentialMonitor:
    """The group-sequential TOST run example by example from running sums (O(1) per example): at each
    planned look it reads Δ̂ ± c_k·SE against ±margin; ``decided`` once a look decides."""

    def __init__(self, margin: Union[str, float], max_n: int, alpha: float = 0.05, looks: int = DEFAULT_LOOKS):
        if not 0.0 < alpha < 0.5:
            raise ValueError(f"alpha {alpha!r} must be in (0, 0.5)")
        parse_margin(margin, 1.0)  # its syntax, before any example
        self.margin_arg, self.alpha, self.max_n = margin, float(alpha), int(max_n)
        self.margin = parse_margin(margin, 1.0)  # nats; a percent is re-read from the teacher loss at each look
        self.teacher_sum = 0.0
        self.looks = planned_looks(max_n, looks)
        self.boundaries = list(spending_boundaries(tuple(c / self.max_n for c in self.looks), self.alpha))
        self.running = RunningRatio()
        self.path: list = []
        self.verdict: Optional[str] = None
        self.look: Optional[int] = None

    @property
    def decided(self) -> bool:
        return self.verdict is not None

    def next_look(self) -> Optional[tuple]:
        """(examples, c) of the next look, or None when decided or past the last."""
        k = len(self.path)
        if self.decided or k >= len(self.looks):
            return None
        return self.looks[k], self.boundaries[k]

    def boundary(self) -> Optional[dict]:
        """What the estimate has to cross at the next look if the spread stays as now (the SEs scaled to the
        look's N): |Δ̂| below ``equivalent_within`` decides equivalent, above ``not_equivalent_beyond`` not."""
        nxt = self.next_look()
        k = self.running.count
        if nxt is None or k < 3 or self.running.n <= 0:
            return None
        b = look_bounds(k, self.running.sums(), self.margin, nxt[1])
        scale = math.sqrt(k / nxt[0]) * look_boundary(nxt[1], nxt[0]) / b["c"]
        half_eq = max(float(b["hi"] - b["delta"]), float(b["delta"] - b["lo"])) * scale
        half_ne = max(float(b["delta"] - b["worse"]), float(b["better"] - b["delta"])) * scale
        return {"look_examples": nxt[0], "c": look_boundary(nxt[1], nxt[0]), "margin": self.margin,
                "equivalent_within": self.margin - half_eq, "not_equivalent_beyond": self.margin + half_ne}

    def add(self, tokens: float, diff: float, teacher: float = 0.0) -> Optional[str]:
        """Add one example (``teacher``: its Σ teacher CE, for a margin in percent of the teacher loss); at a
        look, judge it. Returns the verdict once decided (None before)."""
        if self.decided:
            return self.verdict
        self.running.add(tokens, diff)
        self.teacher_sum += teacher
        if self.running.n > 0:
            self.margin = parse_margin(self.margin_arg, self.teacher_sum / self.running.n)
        nxt = self.next_look()
        if nxt is not None and self.running.count == nxt[0]:
            k = self.running.count
            b = {key: _finite(float(v)) for key, v in look_bounds(k, self.running.sums(), self.margin, nxt[1]).items()}
            self.path.append({"examples": k, "se": _finite(self.running.se()), "margin": self.margin, **b})
            verdict = (_look_verdict(b, self.margin) if self.running.n > 0 and interval_shown(k)
                       and None not in b.values() else None)  # no verdict below N_min
            if verdict is not None:
                self.verdict, self.look = verdict, len(self.path) - 1
        return self.verdict

    def result(self) -> SequentialTest:
        last = self.path[-1] if self.path else None
        n = self.path[self.look]["examples"] if self.decided else self.running.count
        delta = self.path[self.look]["delta"] if self.decided else self.running.ratio
        margin = self.path[self.look]["margin"] if self.decided else self.margin
        return SequentialTest(procedure=PROCEDURE, max_n=self.max_n, looks=list(self.looks),
                              boundaries=list(self.boundaries), alpha=self.alpha, margin=margin,
                              decided=self.decided, verdict=self.verdict or "inconclusive", stopping_n=n,
                              look=self.look, delta=delta,
                              rci=(last["lo"], last["hi"]) if last else None, path=list(self.path))


def sequential_test(tokens: Sequence, diff: Sequence, margin: Union[str, float], max_n: int, alpha: float = 0.05,
                    looks: int = DEFAULT_LOOKS, teacher: Optional[Sequence] = None) -> SequentialTest:
    """The group-sequential TOST on per-example rows in scoring order (what :class:`SequentialMonitor` saw;
    ``teacher``: per-example Σ teacher CE, for a margin in percent of the teacher loss)."""
    n, d = _arrays(tokens, diff)
    t = np.zeros_like(n) if teacher is None else np.asarray(teacher, dtype=np.float64)
    monitor = SequentialMonitor(margin, max(int(max_n), len(n)), alpha, looks)
    for k, v, w in zip(n, d, t):
        if monitor.add(float(k), float(v), float(w)) is not None:
            break
    return monitor.result()


def sequential_paths(tn: np.ndarray, td: np.ndarray, margin: float, max_n: int, alpha: float = 0.05,
                     looks: int = DEFAULT_LOOKS) -> tuple[np.ndarray, np.ndarray]:
    """The group-sequential TOST on many comparisons at once (rows [trials, ≥ max_n] of per-example tokens
    and Σ diff, margin in nats), with :class:`SequentialMonitor`'s arithmetic: (verdict per trial: 0
    undecided, 1 equivalent, 2 not equivalent; stopping N per trial)."""
    trials = tn.shape[0]
    cums = [np.cumsum(a, axis=1) for a in (tn, td, tn * tn, tn * td, td * td, tn ** 3, tn * tn * td,
                                           tn * td * td, td ** 3)]
    counts = planned_looks(max_n, looks)
    bounds = spending_boundaries(tuple(c / max_n for c in counts), alpha)
    verdict = np.zeros(trials, dtype=np.int8)
    stop = np.full(trials, int(max_n))
    for k, c in zip(counts, bounds):
        b = look_bounds(k, tuple(a[:, k - 1] for a in cums), margin, c)
        open_ = (verdict == 0) & interval_shown(k)
        eq = open_ & (b["lo"] > -margin) & (b["hi"] < margin)
        ne = open_ & ~eq & ((b["worse"] > margin) | (b["better"] < -margin))
        verdict[eq], verdict[ne] = 1, 2
        stop[eq | ne] = k
    return verdict, stop


def simulate_sequential(tokens: np.ndarray, diff: np.ndarray, true_delta: float, margin: float, max_n: int,
                        alpha: float = 0.05, looks: int = DEFAULT_LOOKS, trials: int = 2000,
                        seed: int = 0) -> dict:
    """Vectorised simulation of the group-sequential TOST on rows resampled from ``tokens``/``diff`` shifted
    so that their token-weighted Δ is ``true_delta``: rates of each verdict and the mean stopping N."""
    n, d = _arrays(tokens, diff)
    d = d - (d.sum() / n.sum() - true_delta) * n
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(n), size=(trials, int(max_n)))
    verdict, stop = sequential_paths(n[idx], d[idx], margin, max_n, alpha, looks)
    return {"equivalent": float((verdict == 1).mean()), "not_equivalent": float((verdict == 2).mean()),
            "undecided": float((verdict == 0).mean()), "mean_stopping_n": float(stop.mean())}


def simulate_coverage(tokens: np.ndarray, values: np.ndarray, sizes: Sequence[int], level: float = 0.95,
                      trials: int = 4000, seed: int = 0) -> dict:
    """{N: coverage} of the ``level`` t interval of the ratio Σ values / Σ tokens on N rows resampled from
    the given rows (the population ratio is the truth)."""
    n, d = _arrays(tokens, values)
    truth = d.sum() / n.sum()
    rng = np.random.default_rng(seed)
    out = {}
    for size in sizes:
        idx = rng.integers(0, len(n), size=(trials, int(size)))
        tn, td = n[idx], d[idx]
        r = td.sum(axis=1) / tn.sum(axis=1)
        resid = td - r[:, None] * tn
        se = np.sqrt(size / (size - 1) * (resid ** 2).sum(axis=1)) / tn.sum(axis=1)
        q = t_quantile(0.5 + level / 2.0, size - 1)
        out[int(size)] = float((np.abs(r - truth) <= q * se).mean())
    return out


def interval_text(ci: Optional[Sequence], digits: int = 4) -> str:
    """'[+0.0123, +0.0456]', or 'not shown (N < 20)' where no interval is shown (``ci`` None)."""
    if ci is None:
        return f"not shown (N < {MIN_INTERVAL_N})"
    return f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def p_text(p: Optional[float]) -> str:
    """A p-value for a table: '3.2e-05', '<1e-15', or '—' where none is given (N < MIN_INTERVAL_N)."""
    if p is None:
        return "—"
    return f"{p:.2g}" if p >= 1e-15 else "<1e-15"
