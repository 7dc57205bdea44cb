"""Verified allocation: the greedy-path prefix whose measured Δloss meets a loss budget (or the first one
at a parameter target), as a plan.

With a loss budget, the path prefix whose prediction meets the budget is measured with real forward
passes on the validation split, then the prefix length is bisected (forward when there is slack, back
when over) until the measured Δloss ≤ budget. With a parameter target the prefix is the first one at or
below the target (within one step), measured once. With healing in the loop (``SearchSettings.heal``)
every measured student is healed first (on the calibration examples), so the budget is checked after
healing. An optional final stage recompresses the found plan with the method that refines the path's
closed form layer by layer (``methods.refining``: ``refit``) and keeps it when the validation loss drops.
The path's closed form is the registry's ``methods.basis_method()`` (``whitened``): no method is named here.

The result is an ordinary :class:`~lowrank_core.plan.Plan` (per-matrix ranks, method per rule) and a
Pareto table (parameters vs validation loss along the greedy path, verified points marked); any of its
points opens as a plan (:meth:`Allocation.plan_at`).
Losses are mean answer-token cross-entropy in nats.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace
from typing import Optional, Sequence, Union

from .. import methods
from ..linears import LinearInfo, count_parameters, linear_map
from ..compress import compress
from ..heal import copy_student, heal
from ..layerwise import is_dispatched, unhooked
from ..lowrank import LowRankLinear
from ..plan import Plan
from ..progress import Progress, ensure_progress, staged
from ..stats import loss_difference
from ..student import build_student
from .path import Step, greedy_path, plan_from_ranks, ranks_after
from .profile import ELIGIBLE, Profile, SearchSettings, build_profile, low_rank_module, suffix_loss


class BudgetError(ValueError):
    """A loss budget or parameter target that cannot be used."""


def parse_budget(budget: Union[str, float, int], teacher_loss: float) -> float:
    """Absolute Δloss in nats: ``"1%"`` = 1 % of ``teacher_loss``; ``0.02`` / ``"0.02"`` = 0.02 nats; >= 0."""
    try:
        return loss_difference(budget, teacher_loss, "loss budget", allow_zero=True)
    except ValueError as e:
        raise BudgetError(str(e)) from None


def decoder_target(model, keep: float, modules: Sequence[str] = None) -> int:
    """Total parameters after keeping ``keep`` of the eligible decoder linears' weight parameters."""
    if not 0 < keep <= 1:
        raise BudgetError(f"keep fraction {keep!r} must be in (0, 1]")
    modules = ELIGIBLE if modules is None else tuple(modules)
    eligible = sum(li.params for li in linear_map(model) if li.layer is not None and li.module in modules)
    return count_parameters(model) - int(round((1 - keep) * eligible))


def search_goal(model, budget: Union[str, float, None] = None, keep_params: Optional[float] = None,
                target_params: Optional[int] = None,
                modules: Sequence[str] = None) -> tuple[Union[str, float, None], Optional[int]]:
    """``(budget, target_params)`` for :func:`allocate` from at most one of a loss budget (nats or ``"N%"``),
    a keep fraction of the eligible decoder linears' parameters (:func:`decoder_target`) or a total
    parameter target; none given = a budget of ``"1%"``. A malformed goal raises :class:`BudgetError`
    here, before any long work (a percent budget's nats need the teacher's validation loss, measured later)."""
    if sum(v is not None for v in (budget, keep_params, target_params)) > 1:
        raise BudgetError("give at most one of a loss budget, a keep fraction or a parameter target")
    if keep_params is not None:
        return None, decoder_target(model, keep_params, modules)
    if target_params is not None:
        total = count_parameters(model)
        if not 0 < int(target_params) <= total:
            raise BudgetError(f"target_params {target_params:,} must be in 1 .. {total:,} (the model's parameters)")
        return None, int(target_params)
    budget = "1%" if budget is None else budget
    parse_budget(budget, 1.0)  # its form only
    return budget, None


_NOT_SERIALISED = ("plan", "student", "path", "infos")


@dataclass
class Allocation:
    plan: Plan
    ranks: dict[str, int]
    params_before: int
    params_after: int
    teacher_loss: float        # teacher on the validation split
    val_loss: float            # student on the validation split (measured)
    val_examples: int
    val_tokens: int            # answer tokens of the validation split
    budget: Optional[float]    # nats (None in parameter-target mode)
    target_params: Optional[int]
    predicted_delta: float
    steps: int                 # greedy-path prefix taken
    path_length: int
    pareto: list[dict]
    verified: list[dict]       # each real forward pass: steps, params, val_loss, delta, ok
    matrices: list[dict]
    timings: dict[str, float]
    method: str = field(default_factory=methods.basis_method)   # the path's closed form, or the refining stage's
    refit: Optional[dict] = None
    heal: Optional[dict] = None  # healing in the loop: {prefix length: HealResult summary}
    student: object = None     # the verified student (nn.Module), not serialised
    path: list[Step] = field(default_factory=list, repr=False)          # the greedy path, not serialised
    infos: list[LinearInfo] = field(default_factory=list, repr=False)   # the profiled matrices, not serialised

    @property
    def removed(self) -> int:
        return self.params_before - self.params_after

    def ranks_at(self, steps: int) -> dict[str, int]:
        """{matrix name: rank} after the first ``steps`` moves of the greedy path (a Pareto row's ``steps``)."""
        if not 0 <= int(steps) <= len(self.path):
            raise ValueError(f"steps {steps!r} must be in 0 .. {len(self.path)} (the greedy path's length)")
        return ranks_after(self.path, int(steps))

    def plan_at(self, steps: int, method: Optional[str] = None) -> Plan:
        """The plan of any point of the greedy path (a Pareto row's ``steps``): one rule per (module, rank).
        ``method`` defaults to the one the search measured there: the found plan's (the refining method's,
        e.g. ``refit``, when the final stage was kept) at the found prefix, the path's closed form
        (``methods.basis_method()``: ``whitened``) anywhere else."""
        if method is None:
            method = self.method if int(steps) == self.steps else methods.basis_method()
        return plan_from_ranks(self.ranks_at(steps), self.infos, method=method)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_SERIALISED}
        d["plan"] = self.plan.to_dict()
        d["removed"] = self.removed
        d["val_delta"] = self.val_loss - self.teacher_loss
        return d


class _Verifier:
    """Measures validation loss of the student for a path prefix (healed first when the settings say
    so); memoises factors and results."""

    def __init__(self, teacher, profile: Profile, steps: list[Step], tokenizer=None, heal_examples=(),
                 progress: Optional[Progress] = None):
        self.teacher, self.profile, self.steps = teacher, profile, steps
        self.modules = dict(teacher.named_modules())
        self.device = profile.settings.compression.device   # where factors and suffix passes compute
        self.cache: dict[tuple, LowRankLinear] = {}
        self.results: dict[int, float] = {0: profile.teacher_loss}
        self.passes = 0
        self.tokenizer, self.heal_examples = tokenizer, list(heal_examples)
        self.healing = profile.settings.heal
        self.progress = ensure_progress(progress)
        self.healed: dict[int, object] = {}       # the latest healed student, by prefix length
        self.heal_results: dict[int, dict] = {}   # every healing: prefix length -> HealResult summary

    def student(self, k: int):
        """The student after ``k`` steps; factors are kept only for the latest student (memory bound)."""
        cache, reps = {}, {}
        for name, rank in ranks_after(self.steps, k).items():
            key = (name, rank)
            if key not in self.cache:
                self.cache[key] = low_rank_module(self._linear(name), self.profile.bases[name], rank, self.device)
            reps[name] = cache[key] = self.cache[key]
        self.cache = cache
        return build_student(self.teacher, reps)

    def _linear(self, name: str):
        """The teacher's linear ``name``; when accelerate offloaded it (``meta`` weight), a hook-free copy
        holding its weight on its execution device."""
        linear = self.modules[name]
        return unhooked(self.teacher, name) if is_dispatched(linear) else linear

    def final_student(self, k: int):
        """The student of prefix ``k`` as verified (healed when healing is on)."""
        return self.healed.get(k) or self.student(k)

    def loss(self, k: int) -> float:
        if k not in self.results:
            student = self.student(k)
            if self.healing.enabled and k:
                student = copy_student(student)  # the memoised factors stay the closed-form ones
                h = heal(self.teacher, student, self.tokenizer, self.heal_examples, self.healing,
                         progress=staged(self.progress, "heal", f"healing prefix {k}: "))
                self.heal_results[k] = {key: v for key, v in h.to_dict().items() if key not in ("curve", "settings")}
                self.healed = {k: student}  # one healed student kept (memory bound)
            pi = self.profile.val_inputs
            self.results[k] = suffix_loss(student, pi, self.profile.val_batches, 0, pi.hidden, device=self.device)
            self.passes += 1
        return self.results[k]


def _last_within(steps: list[Step], limit: float) -> int:
    k = 0
    while k < len(steps) and steps[k].predicted <= limit:
        k += 1
    return k


def _search_budget(verifier: _Verifier, steps: list[Step], budget: float, teacher_loss: float,
                   max_verify: int, progress: Progress) -> int:
    """Largest path prefix found whose measured Δloss <= budget (Δloss assumed to grow along the path):
    start where the prediction meets the budget, extrapolate forward while there is slack, bisect once
    a prefix is over."""
    lo, hi = 0, len(steps) + 1          # lo: known within budget; hi: known over (len+1: none yet)
    k = _last_within(steps, budget)
    while lo < k < hi and verifier.passes < max_verify:
        progress(verifier.passes, max_verify, f"verifying a plan of {k} greedy steps", stage="verify")
        delta = verifier.loss(k) - teacher_loss
        if delta <= budget:
            lo = k
            if hi > len(steps):
                scale = min(4.0, budget / delta) if delta > 0 else 4.0
                k = max(_last_within(steps, steps[k - 1].predicted * scale), k + 1)
                continue
        else:
            hi = k
        k = (lo + hi) // 2
    return lo


def _pareto(steps: list[Step], params_before: int, teacher_loss: float, verified: dict[int, float],
            points: int = 24) -> list[dict]:
    ks = {round(j * len(steps) / points) for j in range(points + 1)} | set(verified)
    rows = []
    for k in sorted(ks):
        removed = steps[k - 1].removed if k else 0
        predicted = steps[k - 1].predicted if k else 0.0
        rows.append({"steps": k, "params": params_before - removed, "removed": removed,
                     "kept": (params_before - removed) / params_before, "predicted_loss": teacher_loss + predicted,
                     "val_loss": verified.get(k), "verified": k in verified})
    return rows


def allocate(teacher, tokenizer, calib_examples, val_examples, budget: Union[str, float, None] = "1%",
             target_params: Optional[int] = None, settings: Optional[SearchSettings] = None,
             profile: Optional[Profile] = None, progress: Optional[Progress] = None) -> Allocation:
    """Per-matrix ranks removing the most parameters within ``budget`` (nats or ``"N%"`` of the teacher's
    validation loss, verified on ``val_examples``) or reaching ``target_params`` total parameters.

    ``val_examples`` must come from the calibration side (``data.make_split(..., n_val=...).val``);
    ``profile`` (from :func:`build_profile`) lets several searches share one sensitivity measurement.
    """
    settings = profile.settings if profile is not None else (settings or SearchSettings())
    if (budget is None) == (target_params is None):
        raise BudgetError("give exactly one of a loss budget or a parameter target")
    progress = ensure_progress(progress)
    if profile is None:
        profile = build_profile(teacher, tokenizer, calib_examples, val_examples, settings, progress)
    start = time.perf_counter()
    params_before = count_parameters(teacher)
    steps = greedy_path(profile.matrices)
    if settings.heal.enabled and not list(calib_examples):
        raise BudgetError("allocation with healing needs calibration examples to heal on")
    heal_examples = list(calib_examples)[: settings.heal.examples or None]
    verifier = _Verifier(teacher, profile, steps, tokenizer, heal_examples, progress)
    nats = None
    if target_params is not None:
        target_params = int(target_params)
        if target_params > params_before:
            raise BudgetError(f"target_params {target_params:,} exceeds the model's {params_before:,} parameters")
        k = next((j + 1 for j, s in enumerate(steps) if params_before - s.removed <= target_params), len(steps))
        verifier.loss(k)
    else:
        nats = parse_budget(budget, profile.teacher_loss)
        k = _search_budget(verifier, steps, nats, profile.teacher_loss, settings.max_verify, progress)
    ranks = ranks_after(steps, k)
    removed = steps[k - 1].removed if k else 0
    verified = [{"steps": j, "params": params_before - (steps[j - 1].removed if j else 0), "val_loss": v,
                 "delta": v - profile.teacher_loss, "ok": nats is None or v - profile.teacher_loss <= nats}
                for j, v in sorted(verifier.results.items()) if j]
    infos = [p.info for p in profile.matrices.values()]
    matrix_rows = [{**p.row(), "rank": ranks.get(name), "dense": name not in ranks,
                    "predicted_delta": p.predicted(ranks.get(name))} for name, p in profile.matrices.items()]
    result = Allocation(
        plan=plan_from_ranks(ranks, infos), ranks=ranks, params_before=params_before,
        params_after=params_before - removed, teacher_loss=profile.teacher_loss, val_loss=verifier.loss(k),
        val_examples=profile.val_examples, val_tokens=profile.val_tokens,
        budget=nats, target_params=target_params, predicted_delta=steps[k - 1].predicted if k else 0.0,
        steps=k, path_length=len(steps), pareto=_pareto(steps, params_before, profile.teacher_loss, verifier.results),
        verified=verified, matrices=matrix_rows, timings={**profile.timings, "search": time.perf_counter() - start},
        student=verifier.final_student(k), heal=verifier.heal_results or None, path=steps, infos=infos)
    if settings.refit and ranks:
        _refit_stage(result, teacher, tokenizer, calib_examples, profile, progress)
    return result


def _refit_stage(result: Allocation, teacher, tokenizer, calib_examples, profile: Profile, progress) -> None:
    """Compress the found plan with the method refining the path's closed form (``methods.refining``:
    ``refit``) and re-verify; keep it when validation loss drops."""
    t0 = time.perf_counter()
    refiner = methods.refining(methods.basis_method())
    if refiner is None:
        raise BudgetError(f"no registered method refines {methods.basis_method()!r}: the final stage has none to run")
    settings = replace(profile.settings.compression, method=refiner)
    plan = result.plan_at(result.steps, method=refiner)
    out = compress(teacher, tokenizer, plan, calib_examples, settings, progress=progress)
    pi = profile.val_inputs
    loss = suffix_loss(out.student, pi, profile.val_batches, 0, pi.hidden, device=settings.device)
    result.refit = {"val_loss": loss, "val_delta": loss - result.teacher_loss, "kept": loss < result.val_loss,
                    "seconds": time.perf_counter() - t0, "curves": out.refit_curves}
    if loss < result.val_loss:
        result.plan, result.val_loss, result.method, result.student = plan, loss, refiner, out.student
    result.timings["refit"] = time.perf_counter() - t0
