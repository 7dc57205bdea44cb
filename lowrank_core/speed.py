"""Inference speed, honestly: does a rank-r factor pair run faster than the dense matrix it replaces?

A rank-r pair of an ``out x in`` weight costs ``r*(in+out)`` parameters and multiply-adds per token, so it
*saves parameters* below the parameter break-even rank ``out*in // (out+in)``. Whether it also *runs
faster* depends on the machine, the dtype and the number of tokens per call: two small matmuls have more
overhead than one big one, and a decode step (one token) is memory- and launch-bound. This module times it:

- :func:`time_linear`: seconds per call of the dense ``F.linear`` or of the factorised pair (the two
  ``F.linear`` calls of ``lowrank.LowRankLinear.forward``) on random data;
- :func:`speed_breakeven`: the largest rank whose pair is not slower than the dense matrix (bisection);
- :func:`shape_groups` / :func:`measure_shapes` / :func:`speed_rows`: the same for every distinct linear
  shape of a model (the Budget page's table and ``bench/inference_speed.py``).

Rounding ranks to a multiple the kernels like (``Plan.rank_multiple``) is the plan's: ``plan.round_rank``.

Timings are of one machine at one moment (other processes, thread count and clock scaling move them);
near the crossover two ranks can swap, so a break-even rank is a region, not a sharp number.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

PREFILL_TOKENS = 512   # a prompt's forward pass: tokens per call
DECODE_TOKENS = 1      # one generated token per call (batch 1)

__all__ = ["PREFILL_TOKENS", "DECODE_TOKENS", "time_linear", "SpeedBreakeven", "speed_breakeven", "ShapeGroup",
           "shape_groups", "measure_shapes", "speed_rows"]


# ----------------------------------------------------------------------------- timing one linear
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_linear(out_features: int, in_features: int, rank: Optional[int], tokens: int, device="cpu",
                dtype: torch.dtype = torch.float32, repeats: int = 5, min_repeat_s: float = 2e-3,
                max_seconds: float = 1.0, seed: int = 0) -> float:
    """Median seconds per call of ``y = x Wᵀ`` (``rank=None``: one dense ``F.linear``, ``W [out, in]``) or
    of the factorised pair ``y = (x downᵀ) upᵀ`` (``down [rank, in]``, ``up [out, rank]``, two ``F.linear``
    calls, as ``LowRankLinear`` computes it), for ``x [tokens, in]`` of random values, no bias.

    Warm-up first (two calls), then ``repeats`` timed repeats, each of as many calls as make it last at least
    ``min_repeat_s`` (one call of a small shape is microseconds, below timer resolution); repeats stop early
    once ``max_seconds`` are spent (at least one is timed). ``torch.cuda.synchronize`` brackets each repeat
    on CUDA. Uses the current ``torch.get_num_threads()`` on CPU.
    """
    for label, v in (("out_features", out_features), ("in_features", in_features), ("tokens", tokens),
                     ("repeats", repeats)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{label}={v!r} is not allowed; it must be a positive integer")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)
                             or not 1 <= rank <= min(out_features, in_features)):
        raise ValueError(f"rank={rank!r} is not allowed; use None (dense) or 1..{min(out_features, in_features)}")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):  # random normal values (never uninitialised memory: denormals would slow CPU matmuls)
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype) * 0.05

    x = rand(tokens, in_features)
    if rank is None:
        weight = rand(out_features, in_features)

        def call():
            return F.linear(x, weight)
    else:
        down, up = rand(rank, in_features), rand(out_features, rank)

        def call():
            return F.linear(F.linear(x, down), up)

    with torch.inference_mode():
        call()
        _sync(device)
        t0 = time.perf_counter()
        call()
        _sync(device)
        one = max(time.perf_counter() - t0, 1e-7)
        inner = max(1, min(10_000, int(min_repeat_s / one)))
        times: list[float] = []
        spent_from = time.perf_counter()
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                call()
            _sync(device)
            times.append((time.perf_counter() - t0) / inner)
            if time.perf_counter() - spent_from > max_seconds:
                break
    return statistics.median(times)


# ----------------------------------------------------------------------------- break-even of one shape
@dataclass(frozen=True)
class SpeedBreakeven:
    """The measured speed break-even of one ``out x in`` shape at ``tokens`` tokens per call.

    ``rank``: the largest rank whose factor pair took no longer than the dense matrix (0: even rank 1 is
    slower; ``max_rank``: every rank is faster). ``param_rank``: the parameter break-even ``out*in //
    (out+in)``, for reference. ``points``: every (rank, seconds per call) timed, by rank. Seconds are per call
    of ``tokens`` tokens.
    """

    out_features: int
    in_features: int
    tokens: int
    device: str
    dtype: str
    dense_seconds: float
    rank: int
    param_rank: int
    points: tuple = field(default_factory=tuple)  # ((rank, seconds), ...) ascending rank

    @property
    def shape(self) -> str:
        return f"{self.out_features} x {self.in_features}"

    @property
    def max_rank(self) -> int:
        return min(self.out_features, self.in_features)

    def speedup(self, rank: int) -> Optional[float]:
        """dense seconds / factorised seconds at a timed ``rank`` (None if that rank was not timed)."""
        seconds = dict(self.points).get(rank)
        return None if seconds is None else self.dense_seconds / seconds

    def to_dict(self) -> dict:
        d = asdict(self)
        d["points"] = [list(p) for p in self.points]
        d["shape"] = self.shape
        return d


def speed_breakeven(out_features: int, in_features: int, tokens: int, device="cpu",
                    dtype: torch.dtype = torch.float32, repeats: int = 5, max_seconds: float = 0.5) -> SpeedBreakeven:
    """Time the dense matrix once, then bisect over ranks ``1..min(out, in)`` for the largest rank whose
    factorised time is at most the dense time (:func:`time_linear` for every timing).

    Ranks 1, the parameter break-even and ``min(out, in)`` are timed first (they bracket the search and are
    worth seeing anyway), then about ``log2(min(out, in))`` bisection points. Assumes the factorised time
    grows with the rank; noise near the crossover can move the answer by a few steps. Cost: about a dozen
    timings of at most ``max_seconds`` each (plus one warm-up call each).
    """
    limit = min(out_features, in_features)
    param_rank = out_features * in_features // (out_features + in_features)
    kw = dict(tokens=tokens, device=device, dtype=dtype, repeats=repeats, max_seconds=max_seconds)
    dense = time_linear(out_features, in_features, None, **kw)
    timed: dict[int, float] = {}

    def ok(r: int) -> bool:
        if r not in timed:
            timed[r] = time_linear(out_features, in_features, r, **kw)
        return timed[r] <= dense

    for r in sorted({1, max(1, param_rank), limit}):
        ok(r)
    if ok(limit):
        found = limit
    elif not ok(1):
        found = 0
    else:
        lo, hi = 1, limit  # ok(lo) and not ok(hi)
        mid_known = max(1, param_rank)
        if lo < mid_known < hi:
            lo, hi = (mid_known, hi) if ok(mid_known) else (lo, mid_known)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        found = lo
    return SpeedBreakeven(out_features, in_features, tokens, str(torch.device(device)), str(dtype).replace("torch.", ""),
                          dense, found, param_rank, tuple(sorted(timed.items())))


# ----------------------------------------------------------------------------- every shape of a model
@dataclass(frozen=True)
class ShapeGroup:
    """One distinct ``out x in`` shape of a model's linears and the modules (short names) that have it."""

    out_features: int
    in_features: int
    modules: tuple
    names: tuple  # full module paths

    @property
    def shape(self) -> str:
        return f"{self.out_features} x {self.in_features}"

    @property
    def param_rank(self) -> int:
        return self.out_features * self.in_features // (self.out_features + self.in_features)


def shape_groups(linears: Sequence) -> list[ShapeGroup]:
    """Distinct shapes of ``linears.LinearInfo`` rows, in first-seen order, with their module names."""
    found: dict[tuple, tuple[list, list]] = {}
    for li in linears:
        modules, names = found.setdefault((li.out_features, li.in_features), ([], []))
        if li.module not in modules:
            modules.append(li.module)
        names.append(li.name)
    return [ShapeGroup(o, i, tuple(m), tuple(n)) for (o, i), (m, n) in found.items()]


def measure_shapes(groups: Sequence[ShapeGroup], tokens: Iterable[int] = (PREFILL_TOKENS, DECODE_TOKENS),
                   device="cpu", dtype: torch.dtype = torch.float32,
                   progress: Optional[Callable[[int, int, str], None]] = None,
                   **kw) -> dict[tuple, SpeedBreakeven]:
    """``{(out, in, tokens): SpeedBreakeven}`` for every group and token count; ``progress(done, total,
    message)`` after each; ``kw`` go to :func:`speed_breakeven` (``repeats``, ``max_seconds``)."""
    tokens = list(tokens)
    total, done, out = len(groups) * len(tokens), 0, {}
    for g in groups:
        for t in tokens:
            if progress is not None:
                progress(done, total, f"timing {g.shape} at {t} token(s) per call")
            out[(g.out_features, g.in_features, t)] = speed_breakeven(g.out_features, g.in_features, t, device,
                                                                      dtype, **kw)
            done += 1
    if progress is not None:
        progress(done, total, "timed every shape")
    return out


def _rank_text(ranks: Sequence[int], total: int) -> str:
    """The plan's ranks of one shape's matrices: '64', '32-64', 'dense', '64 (3 of 6 dense)'."""
    if not ranks:
        return "dense"
    lo, hi = min(ranks), max(ranks)
    text = str(lo) if lo == hi else f"{lo}-{hi}"
    return text if len(ranks) == total else f"{text} ({total - len(ranks)} of {total} dense)"


def speed_rows(groups: Sequence[ShapeGroup], measured: Mapping[tuple, SpeedBreakeven],
               plans: Optional[Mapping[str, Mapping[str, int]]] = None,
               tokens: Sequence[int] = (PREFILL_TOKENS, DECODE_TOKENS),
               labels: Optional[Mapping[int, str]] = None) -> list[dict]:
    """One row per shape: modules, shape, matrices, parameter break-even rank, the measured speed break-even
    rank at each token count (column ``speed break-even rank (<label> <t> tok)``, label from ``labels``,
    default ``prefill`` for more than one token and ``decode`` for one; None if not measured), and one column
    per entry of ``plans`` ({column: {full module name: rank}}, e.g. ``{"plan rank": ...}`` from
    ``resolve_plan``'s assignments): that plan's ranks of the shape's matrices (those it leaves out are dense)."""
    rows = []
    for g in groups:
        row = {"modules": ", ".join(g.modules), "shape": g.shape, "matrices": len(g.names),
               "parameter break-even rank": g.param_rank}
        for t in tokens:
            m = measured.get((g.out_features, g.in_features, t))
            label = (labels or {}).get(t) or ("prefill" if t > 1 else "decode")
            row[f"speed break-even rank ({label} {t} tok)"] = None if m is None else m.rank
        for column, ranks in (plans or {}).items():
            row[column] = _rank_text([ranks[n] for n in g.names if n in ranks], len(g.names))
        rows.append(row)
    return rows
