"""Paired statistics of per-example answer-loss sums: the token-weighted Δ, its interval, tests, a verdict.

Inputs are per-example arrays over the same N examples: ``tokens[i]`` answer tokens and ``diff[i]`` =
Σ student CE − Σ teacher CE over them (nats). The estimate is the ratio Δ = Σ diff / Σ tokens (nats per
answer token, exactly the difference of the two token-weighted mean losses). Its uncertainty is got by
resampling *examples* (tokens of one example are not independent): a paired percentile bootstrap, and
the delta-method standard error of the ratio for the z-test, the equivalence p-values and the
sample-size estimate. Equivalence at a margin m is two one-sided tests (TOST) at level α, decided by
interval inclusion: *equivalent* when the (1 − 2α) bootstrap interval lies inside (−m, m), *not
equivalent* when it lies wholly outside [−m, m], otherwise *inconclusive*.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Union

import numpy as np

VERDICTS = ("equivalent", "not equivalent", "inconclusive")
_CELLS = 4_000_000  # bootstrap index cells drawn at once (reps × N): memory stays ~32 MB


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

    def add(self, n: float, d: float) -> None:
        self.count += 1
        self.n += n
        self.d += d
        self.nn += n * n
        self.nd += n * d
        self.dd += d * d

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
    """Everything said about Δ = student − teacher loss (nats per answer token) on N paired examples."""

    examples: int
    tokens: int
    delta: float
    se: float                      # delta-method standard error of delta
    ci: tuple                      # (lo, hi) percentile bootstrap interval at ``level``
    level: float
    p_value: float                 # two-sided z-test of Δ = 0
    margin: float                  # nats
    alpha: float
    tost_ci: tuple                 # (lo, hi) bootstrap interval at 1 − 2α, the one the verdict reads
    tost_p: float                  # max of the two one-sided p-values (normal approximation)
    verdict: str                   # one of VERDICTS
    more_examples: Optional[int]   # inconclusive: about how many more examples would decide (Δ and SE/√N holding)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ci"], d["tost_ci"] = list(self.ci), list(self.tost_ci)
        return d


def examples_to_decide(n: int, delta: float, se: float, margin: float, alpha: float) -> Optional[int]:
    """More examples after which the (1 − 2α) interval would clear ±margin if Δ and the per-example spread
    stay as measured (SE ∝ 1/√N); None when Δ sits on the margin or SE is 0."""
    gap = abs(abs(delta) - margin)
    if gap <= 0 or se <= 0 or not math.isfinite(se):
        return None
    z = normal_quantile(1.0 - alpha)
    needed = n * (z * se / gap) ** 2
    return max(1, int(math.ceil(needed - n)))


def paired_test(tokens: Sequence, diff: Sequence, margin: float, level: float = 0.95, alpha: float = 0.05,
                reps: int = 2000, seed: int = 0) -> PairedTest:
    """Δ, its bootstrap interval at ``level``, the z-test of Δ = 0 and the TOST verdict at ±``margin`` nats."""
    n, d = _arrays(tokens, diff)
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha {alpha!r} must be in (0, 0.5)")
    delta, se = ratio(n, d), ratio_se(n, d)
    reps_ = bootstrap_ratios(n, d, reps, seed)
    ci, tost_ci = percentile_interval(reps_, level), percentile_interval(reps_, 1.0 - 2.0 * alpha)
    if se > 0:
        p_value = 2.0 * (1.0 - normal_cdf(abs(delta) / se))
        tost_p = max(1.0 - normal_cdf((delta + margin) / se), normal_cdf((delta - margin) / se))
    else:
        p_value = 1.0 if delta == 0 else 0.0
        tost_p = 0.0 if abs(delta) < margin else 1.0
    if -margin < tost_ci[0] and tost_ci[1] < margin:
        verdict, more = "equivalent", None
    elif tost_ci[0] > margin or tost_ci[1] < -margin:
        verdict, more = "not equivalent", None
    else:
        verdict, more = "inconclusive", examples_to_decide(len(n), delta, se, margin, alpha)
    return PairedTest(examples=len(n), tokens=int(n.sum()), delta=delta, se=se, ci=ci, level=level,
                      p_value=p_value, margin=margin, alpha=alpha, tost_ci=tost_ci, tost_p=tost_p,
                      verdict=verdict, more_examples=more)


def verdict_sentence(test: PairedTest, teacher_loss: float) -> str:
    """The verdict in one sentence, with Δ, its interval and the margin."""
    lo, hi = test.ci
    rel = f" ({test.margin / teacher_loss:.2%} of the teacher's loss)" if teacher_loss > 0 else ""
    core = (f"Δloss {test.delta:+.4f} nats/token, {test.level:.0%} interval [{lo:+.4f}, {hi:+.4f}], "
            f"on {test.examples:,} examples ({test.tokens:,} answer tokens)")
    if test.verdict == "equivalent":
        return (f"Equivalent: the student loses the same as the teacher within ±{test.margin:.4f} nats{rel} — "
                f"{core}.")
    if test.verdict == "not equivalent":
        side = "worse" if test.delta > 0 else "better"
        return f"Not equivalent: the student is {side} than the teacher by more than {test.margin:.4f} nats{rel} — {core}."
    more = (f"about {test.more_examples:,} more examples would decide if Δ holds"
            if test.more_examples else "more examples are needed")
    return f"Inconclusive at ±{test.margin:.4f} nats{rel}: {more} — {core}."


def interval_path(tokens: Sequence, diff: Sequence, level: float = 0.95, reps: int = 500, seed: int = 0,
                  start: int = 10, points: int = 12) -> list[dict]:
    """How the interval narrows as examples accumulate: rows {examples, delta, lo, hi} on the first n
    examples for ~``points`` geometrically spaced n from ``start`` to N (in scoring order)."""
    n, d = _arrays(tokens, diff)
    total = len(n)
    sizes = sorted({min(total, int(round(v))) for v in np.geomspace(min(start, total), total, num=points)})
    rows = []
    for size in sizes:
        if n[:size].sum() <= 0:
            continue
        lo, hi = percentile_interval(bootstrap_ratios(n[:size], d[:size], reps, seed), level)
        rows.append({"examples": size, "delta": ratio(n[:size], d[:size]), "lo": lo, "hi": hi})
    return rows
