"""Rank allocation under a loss budget (or a parameter target): which rank for which matrix.

1. **Spectra, exact and free.** The whitened singular values ``s`` of each matrix (``W·L``, ``L Lᵀ = G``
   the calibration Gram) give its relative output error at every rank without a forward pass:
   ``err(r) = Σ_{j>r} s_j² / Σ s_j²``.
2. **Sensitivity, measured.** On a validation split carved from the calibration side (never the
   evaluation split) each matrix is compressed alone to a probe rank and the validation answer loss is
   measured (``probe="matrix"``: the decoder suffix is run for every matrix; ``probe="layer"``: one suffix
   run per decoder layer with all its matrices compressed gives the layer's loss per unit of
   layer-output error, and each matrix's own layer-output error — one layer of compute — splits it).
   ``sensitivity = Δloss(probe) / err(probe)``, so the predicted ``Δloss_i(r) = sensitivity_i · err_i(r)``
   (additive across matrices; second order in the perturbation, hence linear in ``err``). A probe that
   does not raise the loss is treated as noise, not as a free step: it gets its module type's median.
3. **Greedy path.** From all-dense, repeatedly take the move (dense → rank, or a lower rank) with the
   most parameters saved per predicted Δloss. Only ranks whose factors ``r·(in+out)`` are strictly below
   ``out·in`` are candidates, so a factorisation that does not save parameters is never chosen.
4. **Verification.** With a loss budget, the path prefix whose prediction meets the budget is measured
   with real forward passes on the validation split, then the prefix length is bisected (forward when
   there is slack, back when over) until the measured Δloss ≤ budget. With a parameter target the
   prefix is the first one at or below the target (within one step), measured once.

The result is an ordinary :class:`~lowrank_core.plan.Plan` (per-matrix ranks, method per rule) and a
Pareto table (parameters vs validation loss along the greedy path, verified points marked).
Losses are mean answer-token cross-entropy in nats.
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field, fields, replace
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .archmap import ATTN_MODULES, MLP_MODULES, LinearInfo, count_parameters, linear_map
from .calibrate import collect_grams
from .compress import CompressSettings, calibration_batches, compress, split_examples
from .data import IGNORE_INDEX, encode_example, end_of_turn_id, iter_batches
from .decompose import Factors, Whitening, whitening
from .decompose import factors_from, symmetric  # same arithmetic as whitened_factors (bit-identical students)
from .layerwise import LayerInputs, capture_layer_inputs, decoder_layers, final_norm, masked_square_error, run_layer
from .lowrank import LowRankLinear
from .plan import Plan, Rule, rank_for_keep
from .progress import Progress, ensure_progress
from .student import build_student

DEFAULT_KEEPS = (0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
PROBES = ("layer", "matrix")
ELIGIBLE = ATTN_MODULES + MLP_MODULES


class BudgetError(ValueError):
    """A loss budget or parameter target that cannot be used."""


def parse_budget(budget: Union[str, float, int], teacher_loss: float) -> float:
    """Absolute Δloss in nats: ``"1%"`` = 1 % of ``teacher_loss``; ``0.02`` / ``"0.02"`` = 0.02 nats."""
    text = str(budget).strip()
    try:
        value = float(text[:-1]) * teacher_loss / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        raise BudgetError(f"bad loss budget {budget!r}; use nats (e.g. 0.02) or a percent of the teacher "
                          "loss (e.g. '1%')") from None
    if not math.isfinite(value) or value < 0:
        raise BudgetError(f"loss budget {budget!r} must be a finite number >= 0")
    return value


def decoder_target(model, keep: float, modules: Sequence[str] = None) -> int:
    """Total parameters after keeping ``keep`` of the eligible decoder linears' weight parameters."""
    if not 0 < keep <= 1:
        raise BudgetError(f"keep fraction {keep!r} must be in (0, 1]")
    modules = ELIGIBLE if modules is None else tuple(modules)
    eligible = sum(li.params for li in linear_map(model) if li.layer is not None and li.module in modules)
    return count_parameters(model) - int(round((1 - keep) * eligible))


@dataclass
class SearchSettings:
    """``keeps``: candidate keep fractions per matrix (``rank = floor(keep·out·in/(out+in))``), or
    ``ranks``: explicit candidate ranks (either way only ranks that save parameters survive);
    ``modules``: eligible short names; ``probe_keep``: the probe rank's keep fraction; ``probe``:
    ``layer`` (cheap) or ``matrix`` (one suffix pass per matrix); ``val_batch_size``/``val_max_len``:
    validation batches; ``max_verify``: forward passes spent verifying; ``compression``: calibration
    settings shared with :func:`~lowrank_core.compress.compress` (same Grams, hence the same student)."""

    keeps: Sequence[float] = DEFAULT_KEEPS
    ranks: Optional[Sequence[int]] = None
    modules: Sequence[str] = ELIGIBLE
    probe_keep: float = 0.5
    probe: str = "layer"
    val_batch_size: int = 8
    val_max_len: int = 256
    max_verify: int = 8
    refit: bool = False
    compression: CompressSettings = field(default_factory=CompressSettings)

    def validate(self) -> None:
        if self.probe not in PROBES:
            raise ValueError(f"unknown probe {self.probe!r}; allowed: {', '.join(PROBES)}")
        if not 0 < self.probe_keep < 1:
            raise ValueError(f"probe_keep {self.probe_keep!r} must be in (0, 1)")
        if self.ranks is None and (not self.keeps or any(not 0 < k < 1 for k in self.keeps)):
            raise ValueError(f"keeps {list(self.keeps)!r} must be a non-empty list of fractions in (0, 1)")
        if self.ranks is not None and (not self.ranks or any(int(r) < 1 for r in self.ranks)):
            raise ValueError(f"ranks {list(self.ranks)!r} must be a non-empty list of integers >= 1")
        bad = [m for m in self.modules if m not in ELIGIBLE]
        if bad or not self.modules:
            raise ValueError(f"modules {list(self.modules)!r}: allowed {', '.join(ELIGIBLE)}")
        for name in ("val_batch_size", "val_max_len", "max_verify"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        self.compression.validate()


# ----------------------------------------------------------------------------- per-matrix profile
@dataclass
class MatrixProfile:
    """One matrix: its candidate ranks (descending), exact relative output error per rank, sensitivity."""

    info: LinearInfo
    candidates: list[int]          # ranks strictly below break-even, descending
    errors: list[float]            # err(r) for r = 0 .. len(s)  (err[0] = 1)
    probe_rank: int = 0
    probe_delta: float = 0.0       # measured (or layer-split) Δ validation loss at probe_rank, nats
    sensitivity: float = 0.0       # nats per unit of relative output error (> 0)
    imputed: bool = False          # the probe did not raise the loss: a median sensitivity stands in

    def error(self, rank: Optional[int]) -> float:
        return 0.0 if rank is None else self.errors[min(rank, len(self.errors) - 1)]

    def params(self, rank: Optional[int]) -> int:
        return self.info.params if rank is None else self.info.factor_params(rank)

    def predicted(self, rank: Optional[int]) -> float:
        return self.sensitivity * self.error(rank)

    def row(self) -> dict:
        return {"name": self.info.name, "layer": self.info.layer, "module": self.info.module,
                "probe_rank": self.probe_rank, "probe_error": self.error(self.probe_rank),
                "probe_delta": self.probe_delta, "sensitivity": self.sensitivity, "imputed": self.imputed}


def candidate_ranks(info: LinearInfo, settings: SearchSettings) -> list[int]:
    """Distinct ranks >= 1 whose factors save parameters (``r·(in+out) < out·in``), descending."""
    raw = settings.ranks if settings.ranks is not None else [rank_for_keep(info, k) for k in settings.keeps]
    ok = {int(r) for r in raw if 1 <= int(r) <= info.max_rank and info.factor_params(int(r)) < info.params}
    return sorted(ok, reverse=True)


def error_curve(s: torch.Tensor) -> list[float]:
    """err(r) = Σ_{j>r} s_j² / Σ s_j² for r = 0 .. len(s)."""
    e = s.double().pow(2).flip(0).cumsum(0).flip(0)
    total = float(e[0]) if len(e) else 0.0
    if total <= 0:
        return [0.0] * (len(s) + 1)
    return [float(v) / total for v in e] + [0.0]


@dataclass
class Profile:
    """Everything the search needs, computed once per (teacher, calibration, validation):
    matrix profiles, whitened calibration Grams (one per input), the captured validation inputs and the
    teacher's loss on them."""

    matrices: dict[str, MatrixProfile]
    whitenings: dict[str, Whitening]
    bases: dict[str, WhitenedBasis]
    val_inputs: LayerInputs
    val_batches: list[dict]
    teacher_loss: float
    val_examples: int
    val_tokens: int            # answer tokens scored on the validation split
    timings: dict[str, float]
    settings: SearchSettings


def _weights(model) -> dict:
    return dict(model.named_modules())


class WhitenedBasis:
    """One matrix's whitened eigenproblem solved once: its whitened singular values (descending) and
    its whitened factors at any rank by slicing — the same arithmetic as
    :func:`~lowrank_core.decompose.whitened_factors`, so the factors are bit-identical to it.
    Holds one ``min(out, in)``-square float64 eigenvector matrix."""

    def __init__(self, W: torch.Tensor, wh: Whitening):
        W64 = W.detach().to(wh.device, torch.float64)
        self.wide = W.shape[0] <= W.shape[1]
        if self.wide:
            M = wh.output_covariance(W64)
        else:
            A = wh.whiten(W64)
            M = symmetric(A.T @ A)
        lam, vec = torch.linalg.eigh(M)
        self.values = lam.flip(0).clamp_min(0).sqrt()
        self.vectors = vec.flip(1)

    def factors(self, W: torch.Tensor, wh: Whitening, rank: int, bias=None) -> Factors:
        W64 = W.detach().to(wh.device, torch.float64)
        V = self.vectors[:, :rank].contiguous()
        if self.wide:
            return factors_from(V, V.T @ W64, W, bias)
        return factors_from(wh.whiten(W64) @ V, wh.unwhiten(V.T.contiguous()), W, bias)


def low_rank_module(linear, basis: WhitenedBasis, wh: Whitening, rank: int) -> LowRankLinear:
    """Whitened rank-``rank`` replacement of ``linear`` on its device and dtype."""
    W = linear.weight.detach()
    return LowRankLinear.from_factors(basis.factors(W, wh, rank, linear.bias), dtype=W.dtype).to(W.device)


@torch.no_grad()
def suffix_loss(model, inputs: LayerInputs, batches: list[dict], start: int, hidden: list[torch.Tensor]) -> float:
    """Mean answer loss when ``hidden`` enters decoder layer ``start`` of ``model`` (layers run to the end)."""
    layers = decoder_layers(model)
    for i in range(start, len(layers)):
        hidden = run_layer(layers[i], inputs, i, hidden=hidden)
    norm, head = final_norm(model), model.lm_head
    total, tokens = 0.0, 0
    for h, batch in zip(hidden, batches):
        targets = batch["labels"][:, 1:].to(h.device)
        sel = targets != IGNORE_INDEX
        logits = head(norm(h)[:, :-1][sel])
        total += float(F.cross_entropy(logits.float(), targets[sel], reduction="sum").double())
        tokens += int(sel.sum())
    if tokens == 0:
        raise ValueError("the validation batches hold no answer tokens; raise val_max_len or add examples")
    return total / tokens


def fitting_examples(tokenizer, examples, n: int, max_len: int, min_answer: int = 16) -> list:
    """The first ``n`` examples that keep at least ``min_answer`` answer tokens (or their whole answer)
    within ``max_len`` tokens: long prompts would otherwise be dropped and leave a tiny validation set."""
    eot, out = end_of_turn_id(tokenizer), []
    for ex in examples:
        enc = encode_example(tokenizer, ex, max_len, end_of_turn=eot)
        if enc is not None and (enc.answer_tokens >= min_answer or len(enc.input_ids) < max_len):
            out.append(ex)
            if len(out) == n:
                break
    return out


def _calibration(tokenizer, calib_examples, cs: CompressSettings):
    """The fit batches exactly as :func:`compress` builds them (so Grams and students match)."""
    examples = list(calib_examples)[: cs.calib]
    if not examples:
        raise ValueError("rank allocation needs at least one calibration example")
    fit, _ = split_examples(examples, cs.refit.valid_fraction, cs.seed)
    return calibration_batches(tokenizer, fit, cs.batch_size, cs.max_len)


def build_profile(teacher, tokenizer, calib_examples, val_examples, settings: Optional[SearchSettings] = None,
                  progress: Optional[Progress] = None) -> Profile:
    """Grams, exact error curves and measured sensitivities of every eligible matrix (see module doc)."""
    settings = settings or SearchSettings()
    settings.validate()
    progress = ensure_progress(progress)
    timings = {}
    t0 = time.perf_counter()
    infos = [li for li in linear_map(teacher) if li.layer is not None and li.module in settings.modules]
    grams = collect_grams(teacher, _calibration(tokenizer, calib_examples, settings.compression), infos,
                          progress=progress)
    whitenings = {key: whitening(stats) for key, stats in grams.items()}
    del grams
    timings["calibration"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    modules = _weights(teacher)
    matrices, bases = {}, {}
    for k, li in enumerate(infos):
        cands = candidate_ranks(li, settings)
        if not cands:
            continue
        bases[li.name] = basis = WhitenedBasis(modules[li.name].weight, whitenings[li.gram_key])
        probe = max(1, min(rank_for_keep(li, settings.probe_keep), cands[0]))
        matrices[li.name] = MatrixProfile(li, cands, error_curve(basis.values), probe_rank=probe)
        progress(k + 1, len(infos), f"spectrum {li.name}")
    timings["spectra"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    batches = list(iter_batches(tokenizer, val_examples, settings.val_batch_size, settings.val_max_len))
    if not batches:
        raise ValueError("rank allocation needs at least one validation example that fits val_max_len")
    inputs = capture_layer_inputs(teacher, batches)
    teacher_loss = suffix_loss(teacher, inputs, batches, 0, inputs.hidden)
    _probe(teacher, matrices, bases, whitenings, inputs, batches, teacher_loss, settings.probe, progress)
    timings["sensitivity"] = time.perf_counter() - t0
    tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    return Profile(matrices, whitenings, bases, inputs, batches, teacher_loss, sum(len(b["input_ids"]) for b in batches),
                   tokens, timings, settings)


def _probe(teacher, matrices, bases, whitenings, inputs, batches, teacher_loss, mode, progress) -> None:
    """Fill ``probe_delta`` and ``sensitivity`` of every profile, walking the decoder layer by layer."""
    layers = decoder_layers(teacher)
    modules = _weights(teacher)
    hidden = inputs.hidden
    rates: dict[int, float] = {}      # layer mode: Δloss per unit of squared layer-output error
    local: dict[str, float] = {}      # squared layer-output error with one matrix at its probe rank
    for i, layer in enumerate(layers):
        prefix = f"model.layers.{i}."
        mine = [m for name, m in matrices.items() if name.startswith(prefix)]
        out_t = run_layer(layer, inputs, i, hidden=hidden)
        if mine:
            reps = {m.info.name[len(prefix):]: low_rank_module(modules[m.info.name], bases[m.info.name],
                                                               whitenings[m.info.gram_key], m.probe_rank)
                    for m in mine}
            for m in mine:
                rel = m.info.name[len(prefix):]
                out = run_layer(build_student(layer, {rel: reps[rel]}), inputs, i, hidden=hidden)
                local[m.info.name] = _square_error(out, out_t, inputs)
                if mode == "matrix":
                    m.probe_delta = suffix_loss(teacher, inputs, batches, i + 1, out) - teacher_loss
            if mode == "layer":
                out = run_layer(build_student(layer, reps), inputs, i, hidden=hidden)
                joint = _square_error(out, out_t, inputs)
                delta = suffix_loss(teacher, inputs, batches, i + 1, out) - teacher_loss
                rates[i] = delta / joint if joint > 0 and delta > 0 else math.nan
        hidden = out_t
        progress(i + 1, len(layers), f"sensitivity layer {i}")
    if mode == "layer":
        fallback = _median([r for r in rates.values() if r > 0])
        for m in matrices.values():
            rate = rates[m.info.layer]
            m.probe_delta = (rate if rate > 0 else fallback) * local[m.info.name]
            m.imputed = not rate > 0
    _set_sensitivities(matrices.values())


def _square_error(a: list, b: list, inputs: LayerInputs) -> float:
    return sum(masked_square_error(x, y, m)[0] for x, y, m in zip(a, b, inputs.masks))


def _median(values: list[float], default: float = 1.0) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else default


def _set_sensitivities(profiles) -> None:
    """sensitivity = Δloss(probe) / err(probe). A probe that did not raise the loss (Δ <= 0: noise of a
    small validation split, or a LASER-like gain) is not taken as a free step: it gets the median
    sensitivity of its module type (``imputed``), so no step has a zero predicted cost unless its
    output error is exactly zero."""
    profiles = list(profiles)
    raw = {p.info.name: p.probe_delta / p.error(p.probe_rank)
           for p in profiles if p.probe_delta > 0 and p.error(p.probe_rank) > 0}
    overall = _median(list(raw.values()))
    by_module = {mod: _median([v for n, v in raw.items() if n.endswith("." + mod)], overall)
                 for mod in {p.info.module for p in profiles}}
    for p in profiles:
        p.sensitivity = raw.get(p.info.name, by_module[p.info.module])
        p.imputed = p.imputed or p.info.name not in raw


# ----------------------------------------------------------------------------- greedy path
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


def plan_from_ranks(ranks: dict[str, int], infos: Sequence[LinearInfo], method: str = "whitened") -> Plan:
    """A plan with one rule per (module, rank): ``{layers: "3,5-7", modules: [v_proj], rank: 120, method}``."""
    by_name = {li.name: li for li in infos}
    groups: dict[tuple, list[int]] = {}
    for name, rank in ranks.items():
        li = by_name[name]
        groups.setdefault((li.module, int(rank)), []).append(li.layer)
    module_order = {m: k for k, m in enumerate(ELIGIBLE)}
    keys = sorted(groups, key=lambda key: (min(groups[key]), module_order.get(key[0], 99), -key[1]))
    return Plan([Rule(modules=[m], layers=_layer_spec(sorted(groups[(m, r)])), rank=r, method=method)
                 for m, r in keys])


# ----------------------------------------------------------------------------- verified allocation
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
    method: str = "whitened"
    refit: Optional[dict] = None
    student: object = None     # the verified student (nn.Module), not serialised

    @property
    def removed(self) -> int:
        return self.params_before - self.params_after

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("plan", "student")}
        d["plan"] = self.plan.to_dict()
        d["removed"] = self.removed
        d["val_delta"] = self.val_loss - self.teacher_loss
        return d


class _Verifier:
    """Measures validation loss of the student for a path prefix; memoises factors and results."""

    def __init__(self, teacher, profile: Profile, steps: list[Step]):
        self.teacher, self.profile, self.steps = teacher, profile, steps
        self.modules = _weights(teacher)
        self.cache: dict[tuple, LowRankLinear] = {}
        self.results: dict[int, float] = {0: profile.teacher_loss}
        self.passes = 0

    def student(self, k: int):
        """The student after ``k`` steps; factors are kept only for the latest student (memory bound)."""
        cache, reps = {}, {}
        for name, rank in ranks_after(self.steps, k).items():
            key = (name, rank)
            if key not in self.cache:
                p = self.profile.matrices[name]
                self.cache[key] = low_rank_module(self.modules[name], self.profile.bases[name],
                                                  self.profile.whitenings[p.info.gram_key], rank)
            reps[name] = cache[key] = self.cache[key]
        self.cache = cache
        return build_student(self.teacher, reps)

    def loss(self, k: int) -> float:
        if k not in self.results:
            pi = self.profile.val_inputs
            self.results[k] = suffix_loss(self.student(k), pi, self.profile.val_batches, 0, pi.hidden)
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
        progress(verifier.passes, max_verify, f"verifying a plan of {k} greedy steps")
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
                     "predicted_loss": teacher_loss + predicted, "val_loss": verified.get(k),
                     "verified": k in verified})
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
    verifier = _Verifier(teacher, profile, steps)
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
        student=verifier.student(k))
    if settings.refit and ranks:
        _refit_stage(result, teacher, tokenizer, calib_examples, profile, progress)
    return result


def _refit_stage(result: Allocation, teacher, tokenizer, calib_examples, profile: Profile, progress) -> None:
    """Compress the found plan with method ``refit`` and re-verify; keep it when validation loss drops."""
    t0 = time.perf_counter()
    settings = replace(profile.settings.compression, method="refit")
    plan = plan_from_ranks(result.ranks, [p.info for p in profile.matrices.values()], method="refit")
    out = compress(teacher, tokenizer, plan, calib_examples, settings, progress=progress)
    pi = profile.val_inputs
    loss = suffix_loss(out.student, pi, profile.val_batches, 0, pi.hidden)
    result.refit = {"val_loss": loss, "val_delta": loss - result.teacher_loss, "kept": loss < result.val_loss,
                    "seconds": time.perf_counter() - t0, "curves": out.refit_curves}
    if loss < result.val_loss:
        result.plan, result.val_loss, result.method, result.student = plan, loss, "refit", out.student
    result.timings["refit"] = time.perf_counter() - t0
