"""The greedy path: every compression move, best parameters saved per predicted Δloss first.

From all-dense, repeatedly take the move (dense → rank, or a lower rank) with the most parameters saved
per predicted Δloss (``MatrixProfile.predicted``). Only ranks whose factors ``r·(in+out)`` are strictly
below ``out·in`` are candidates, so a factorisation that does not save parameters is never chosen. A
prefix of the path is a set of per-matrix ranks (:func:`ranks_after`), i.e. a plan (:func:`plan_from_ranks`).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Optional, Sequence

from .. import methods
from ..linears import LinearInfo
from ..plan import Plan, Rule, expert_rule_name
from .profile import ELIGIBLE, MatrixProfile


@dataclass(frozen=True)
class Step:
    name: str
    rank_from: Optional[int]   # None = dense
    rank_to: int
    saved: int                 # parameters saved by this step
    cost: float                # predicted Δloss of this step, nats
    removed: int               # cumulative parameters removed after this step
    predicted: float           # cumulative predicted Δloss after this step


def greedy_path(matrices: dict[str, MatrixProfile]) -> list[Step]:
    """All moves, best parameters-saved per predicted Δloss first, until every matrix sits at its
    lowest candidate. A move may skip candidates (lower convex hull of each matrix's curve)."""
    order = {name: k for k, name in enumerate(matrices)}
    current: dict[str, Optional[int]] = {name: None for name in matrices}
    heap: list = []

    def push(name):
        p, cur = matrices[name], current[name]
        lower = p.candidates if cur is None else [r for r in p.candidates if r < cur]
        best = None
        for r in lower:
            saved = p.params(cur) - p.params(r)
            cost = p.predicted(r) - p.predicted(cur)
            ratio = math.inf if cost <= 0 else saved / cost
            key = (-ratio, -saved, order[name])
            if best is None or key < best[0]:
                best = (key, r, saved, cost)
        if best is not None:
            heapq.heappush(heap, (*best[0], name, cur, best[1], best[2], best[3]))

    for name in matrices:
        push(name)
    steps, removed, predicted = [], 0, 0.0
    while heap:
        *_, name, cur, r, saved, cost = heapq.heappop(heap)
        if current[name] != cur:
            continue
        removed += saved
        predicted += cost
        steps.append(Step(name, cur, r, saved, cost, removed, predicted))
        current[name] = r
        push(name)
    return steps


def ranks_after(steps: Sequence[Step], k: int) -> dict[str, int]:
    """{matrix name: rank} after the first ``k`` steps of a path."""
    ranks: dict[str, int] = {}
    for s in steps[:k]:
        ranks[s.name] = s.rank_to
    return ranks


def _layer_spec(layers: list[int]) -> str:
    parts, start = [], None
    for i, v in enumerate(layers):
        if start is None:
            start = v
        if i + 1 == len(layers) or layers[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts)


def plan_from_ranks(ranks: dict[str, int], infos: Sequence[LinearInfo], method: Optional[str] = None) -> Plan:
    """A plan with one rule per (module, rank): ``{layers: "3,5-7", modules: [v_proj], rank: 120, method}``;
    ``method`` defaults to the path's closed form (``methods.basis_method()``: ``whitened``)."""
    method = method or methods.basis_method()
    by_name = {li.name: li for li in infos}
    groups: dict[tuple, list[int]] = {}
    for name, rank in ranks.items():
        li = by_name[name]
        module = li.module if li.expert is None else expert_rule_name(li)   # experts differ: one rule each
        groups.setdefault((module, int(rank)), []).append(li.layer)
    module_order = {m: k for k, m in enumerate(ELIGIBLE)}
    keys = sorted(groups, key=lambda key: (min(groups[key]), module_order.get(key[0], 99), -key[1]))
    return Plan([Rule(modules=[m], layers=_layer_spec(sorted(groups[(m, r)])), rank=r, method=method)
                 for m, r in keys])
