"""Per-matrix profiles: exact error curves and measured sensitivities, computed once per search.

- **Spectra, exact and free.** The whitened singular values ``s`` of each matrix (``W·L``, ``L Lᵀ = G``
  the calibration Gram; the ``whitened`` method's :class:`~lowrank_core.decompose.WhitenedBasis`) give its
  relative output error at every rank without a forward pass: ``err(r) = Σ_{j>r} s_j² / Σ s_j²``.
- **Sensitivity, measured.** On a validation split carved from the calibration side (never the
  evaluation split) each matrix is compressed alone to a probe rank and the validation answer loss is
  measured (``probe="matrix"``: the decoder suffix is run for every matrix; ``probe="layer"``: one suffix
  run per decoder layer with all its matrices compressed gives the layer's loss per unit of
  layer-output error, and each matrix's own layer-output error — one layer of compute — splits it).
  ``sensitivity = Δloss(probe) / err(probe)``, so the predicted ``Δloss_i(r) = sensitivity_i · err_i(r)``
  (additive across matrices; second order in the perturbation, hence linear in ``err``). A probe that
  does not raise the loss is treated as noise, not as a free step: it gets its module type's median.
- **Or gradient scores** (``probe="gradient"``, :mod:`.gradient`): one backward pass per validation
  example scores every whitened singular component of every matrix (``|first-order| + empirical-Fisher``
  term, or the Fisher term alone: ``gradient_score``), and the predicted ``Δloss_i(r)`` is the sum of the
  scores of the components rank ``r`` removes (``MatrixProfile.tail``); no per-matrix forward probe.

**Layer by layer (the 7B path).** The calibration and validation inputs are captured once
(``capture_layer_inputs``) and streamed through the teacher one decoder layer at a time (a
``layerwise.walk_layers`` callback); for layer ``i`` (copied to the compute device ``compression.device``
when set, ``layer_on``): its input Grams are
accumulated in float64 on the teacher's calibration stream (each example alone, without padding, where
``collect_grams`` does so too: the very same sums, bit for bit), its matrices' bases solved, error curves
read, then **its Grams and whitenings are dropped** (the bases keep only what factors need:
:class:`~.bases.StoredBasis`), its layer/matrix probes run on the validation stream, and its bases are
stored in CPU memory (float64, or ``basis_dtype="float32"``) before layer ``i + 1``. At most one layer's
Grams are alive; ``Profile.memory`` reports the bytes (``docs/7b-path.md``: the Mistral-7B table). A
teacher dispatched by accelerate (``device_map``) works as it is: each tensor goes to the device of the
module that reads it, offloaded layers are read through hook-free copies (``layerwise.unhooked``) and the
teacher is never moved nor changed.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .. import methods
from ..arch import arch_of
from ..linears import ATTN_MODULES, MLP_MODULES, LinearInfo, linear_map
from ..calibrate import pieces, gram_representatives
from ..compress import CompressSettings, calibration_data
from ..data import IGNORE_INDEX, encode_example, end_of_turn_id, iter_batches
from ..decompose import Whitening, WhitenedBasis, whitening
from ..evaluate import answer_loss_from_hidden
from ..layerwise import (LayerInputs, capture_layer_inputs, is_dispatched, layer_on, masked_square_error,
                         model_device, module_device, run_layer, walk_layers)
from ..lowrank import LowRankLinear
from ..plan import rank_for_keep
from ..progress import Progress, ensure_progress
from ..heal import HealSettings
from ..student import build_student
from .bases import BASIS_DTYPES, StoredBasis, factor_bytes
from .gradient import GRADIENT_SCORES, ComponentScores, gradient_scores

DEFAULT_KEEPS = (0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
PROBES = ("layer", "matrix", "gradient")
ELIGIBLE = ATTN_MODULES + MLP_MODULES
VAL_OVERDRAW = 4  # validation-side examples read per one wanted: long prompts do not fit val_max_len


@dataclass
class SearchSettings:
    """``keeps``: candidate keep fractions per matrix (``rank = floor(keep·out·in/(out+in))``), or
    ``ranks``: explicit candidate ranks (either way only ranks that save parameters survive);
    ``modules``: eligible short names; ``probe_keep``: the probe rank's keep fraction; ``probe``:
    ``layer`` (cheap), ``matrix`` (one suffix pass per matrix) or ``gradient`` (one backward pass per
    validation example; ``gradient_score``: ``taylor`` = ``|first order| + Fisher``, or ``fisher``: see
    :mod:`.gradient`; the probe rank is then only reported); ``val_batch_size``/``val_max_len``:
    validation batches; ``max_verify``: forward passes spent verifying; ``compression``: calibration
    settings shared with :func:`~lowrank_core.compress.compress` (same Grams, hence the same student; its
    ``device`` is the profile's compute device — each layer is copied there in turn, e.g. ``cuda`` for a
    teacher in CPU memory — and ``offload`` keeps the stored hidden streams in CPU memory);
    ``basis_dtype``: the stored eigenvectors' dtype (``float64``: factors bit-identical to compression's;
    ``float32``: half the memory, factors within ~1e-7 relative, see ``docs/7b-path.md``); ``heal``: when
    enabled, every verified prefix's student is healed first (on the calibration examples) and the budget
    is checked after healing."""

    keeps: Sequence[float] = DEFAULT_KEEPS
    ranks: Optional[Sequence[int]] = None
    modules: Sequence[str] = ELIGIBLE
    probe_keep: float = 0.5
    probe: str = "layer"
    gradient_score: str = "taylor"
    val_batch_size: int = 8
    val_max_len: int = 256
    max_verify: int = 8
    refit: bool = False
    basis_dtype: str = "float64"
    compression: CompressSettings = field(default_factory=CompressSettings)
    heal: HealSettings = field(default_factory=HealSettings)

    def validate(self) -> None:
        if self.probe not in PROBES:
            raise ValueError(f"unknown probe {self.probe!r}; allowed: {', '.join(PROBES)}")
        if self.gradient_score not in GRADIENT_SCORES:
            raise ValueError(f"unknown gradient_score {self.gradient_score!r}; allowed: {', '.join(GRADIENT_SCORES)}")
        if self.basis_dtype not in BASIS_DTYPES:
            raise ValueError(f"unknown basis_dtype {self.basis_dtype!r}; allowed: {', '.join(BASIS_DTYPES)}")
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
        self.heal.validate()


@dataclass
class MatrixProfile:
    """One matrix: its candidate ranks (descending), exact relative output error per rank, sensitivity.

    With the gradient probe, ``tail`` (``Σ_{i≥r} score_i`` for r = 0 .. len(s)) is the predicted Δloss
    per rank and ``scores`` its per-component terms; ``probe_delta`` is then ``tail[probe_rank]`` and
    ``sensitivity`` the equivalent ``tail[probe_rank] / err(probe_rank)``, both for display only."""

    info: LinearInfo
    candidates: list[int]          # ranks strictly below break-even, descending
    errors: list[float]            # err(r) for r = 0 .. len(s)  (err[0] = 1)
    probe_rank: int = 0
    probe_delta: float = 0.0       # measured (or layer-split) Δ validation loss at probe_rank, nats
    sensitivity: float = 0.0       # nats per unit of relative output error (> 0)
    imputed: bool = False          # the probe did not raise the loss: a median sensitivity stands in
    tail: Optional[list[float]] = None          # gradient probe: predicted Δloss at r = 0 .. len(s)
    scores: Optional[ComponentScores] = None    # gradient probe: per-component first-order / Fisher terms

    def error(self, rank: Optional[int]) -> float:
        return 0.0 if rank is None else self.errors[min(rank, len(self.errors) - 1)]

    def params(self, rank: Optional[int]) -> int:
        return self.info.params if rank is None else self.info.factor_params(rank)

    def predicted(self, rank: Optional[int]) -> float:
        if rank is not None and self.tail is not None:
            return self.tail[min(rank, len(self.tail) - 1)]
        return self.sensitivity * self.error(rank)

    def row(self) -> dict:
        row = {"name": self.info.name, "layer": self.info.layer, "module": self.info.module,
               "probe_rank": self.probe_rank, "probe_error": self.error(self.probe_rank),
               "probe_delta": self.probe_delta, "sensitivity": self.sensitivity, "imputed": self.imputed}
        if self.scores is not None:   # the gradient probe's first-order and Fisher parts at the probe rank
            row["first_order"] = self.scores.first_order(self.probe_rank)
            row["fisher"] = float(self.scores.fisher[self.probe_rank:].sum())
        return row


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
    matrix profiles, each matrix's solved whitened basis (:class:`~.bases.StoredBasis`, in CPU memory,
    without its Gram), the captured validation inputs and the teacher's loss on them.

    ``whitenings`` is kept for compatibility and is empty: the layer-by-layer profile drops every Gram
    once its layer is solved. ``memory``: bytes of what was held (``gram_bytes_peak``: the most Gram
    bytes alive at once, one layer's; ``gram_bytes_all_layers``: what an all-at-once profile holds;
    ``basis_bytes`` / ``factor_bytes``: the stored bases and tall matrices' Gram factors; ``basis_dtype``)."""

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
    memory: dict = field(default_factory=dict)


def low_rank_module(linear, basis: WhitenedBasis, rank: int, device=None) -> LowRankLinear:
    """Whitened rank-``rank`` replacement of ``linear`` (the weight ``basis`` was solved for), on its
    device and dtype: the factors :func:`~lowrank_core.compress.compress` builds, bit for bit.
    ``device``: where the float64 maths runs (default: the weight's; e.g. ``cuda`` for a teacher in CPU
    memory), the module is then moved back to the weight's device."""
    W = linear.weight.detach()
    home = W.device
    if device is not None and torch.device(device) != home:
        W = W.to(device)
    return LowRankLinear.from_factors(basis.factors(W, rank, linear.bias), dtype=W.dtype).to(home)


def _head_name(model, head) -> str:
    return next(name for name, m in model.named_modules() if m is head)


@torch.no_grad()
def suffix_loss(model, inputs: LayerInputs, batches: list[dict], start: int, hidden: list[torch.Tensor],
                device=None) -> float:
    """Mean answer loss when ``hidden`` enters decoder layer ``start`` of ``model`` (layers run to the end,
    then the final norm, then :func:`~lowrank_core.evaluate.answer_loss_from_hidden`: the evaluation's loss).

    ``device``: where the layers, the final norm and the head compute (each copied there in turn when
    elsewhere; default: where each module computes — a model dispatched by accelerate is fine: every
    tensor is moved to the device of the module that reads it, the model itself is never moved)."""
    spec = arch_of(model)
    layers = spec.decoder_layers(model)
    for i in range(start, len(layers)):
        hidden = run_layer(layers[i], inputs, i, hidden=hidden, device=device)
    norm = spec.final_norm(model)
    norm_device = torch.device(device) if device is not None else module_device(norm)
    norm = layer_on(norm, norm_device) if any(True for _ in norm.parameters()) else norm
    head = spec.head_of(model)
    scorer, head_device = model, module_device(head)
    if device is not None and not is_dispatched(head) and head_device != torch.device(device):
        moved = layer_on(head, device)   # a view of the model whose head computes on ``device``
        scorer, head_device = build_student(model, {_head_name(model, head): moved}), module_device(moved)
    total, tokens = 0.0, 0
    for h, batch in zip(hidden, batches):
        x = norm(h.to(norm_device)).to(head_device)
        loss_sum, n = answer_loss_from_hidden(scorer, x, batch["labels"])
        total, tokens = total + loss_sum, tokens + n
    if tokens == 0:
        raise ValueError("the validation batches hold no answer tokens; raise val_max_len or add examples")
    return total / tokens


def fitting_examples(tokenizer, examples, n: int, max_len: int, min_answer: int = 16) -> list:
    """The first ``n`` examples that keep at least ``min_answer`` answer tokens (or their whole answer)
    within ``max_len`` tokens: long prompts would otherwise be dropped and leave a tiny validation set
    (read ``VAL_OVERDRAW · n`` validation-side examples to get ``n``)."""
    eot, out = end_of_turn_id(tokenizer), []
    for ex in examples:
        enc = encode_example(tokenizer, ex, max_len, end_of_turn=eot)
        if enc is not None and (enc.answer_tokens >= min_answer or len(enc.input_ids) < max_len):
            out.append(ex)
            if len(out) == n:
                break
    return out


def build_profile(teacher, tokenizer, calib_examples, val_examples, settings: Optional[SearchSettings] = None,
                  progress: Optional[Progress] = None) -> Profile:
    """Grams, exact error curves and measured sensitivities of every eligible matrix, layer by layer
    (see module doc): at most one decoder layer's Grams alive, bases kept in CPU memory."""
    settings = settings or SearchSettings()
    settings.validate()
    progress = ensure_progress(progress)
    timings = {"calibration": 0.0, "spectra": 0.0, "sensitivity": 0.0}
    t0 = time.perf_counter()
    infos = [li for li in linear_map(teacher) if li.layer is not None and li.module in settings.modules]
    fit = calibration_data(tokenizer, calib_examples, settings.compression).fit  # compress's fit batches
    if not fit:
        raise ValueError("rank allocation needs at least one calibration example")
    batches = list(iter_batches(tokenizer, val_examples, settings.val_batch_size, settings.val_max_len))
    if not batches:
        raise ValueError("rank allocation needs at least one validation example that fits val_max_len")
    spec = arch_of(teacher)
    layers = spec.decoder_layers(teacher)
    cs = settings.compression
    device = torch.device(cs.device) if cs.device else None   # None: each layer computes where it is
    store = "cpu" if cs.offload else None
    cands = {li.name: candidate_ranks(li, settings) for li in infos}
    wanted = [li for li in infos if cands[li.name]]
    last = max((li.layer for li in wanted), default=-1)        # the calibration stream is needed up to here
    # collect_grams forwards each example alone, unpadded, on CPU: the same pieces give the same sums
    first = device or (module_device(layers[0]) if len(layers) else model_device(teacher))
    unpad = first.type == "cpu"
    alone = [{"input_ids": ids, "attention_mask": m} for b in fit
             for ids, m in pieces(b["input_ids"], b.get("attention_mask", torch.ones_like(b["input_ids"])), unpad)]
    calib = capture_layer_inputs(teacher, alone, store_device=store, progress=progress) if wanted else None
    timings["calibration"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    inputs = capture_layer_inputs(teacher, batches, store_device=store)
    teacher_loss = suffix_loss(teacher, inputs, batches, 0, inputs.hidden, device=device)
    timings["sensitivity"] += time.perf_counter() - t0

    dtype = BASIS_DTYPES[settings.basis_dtype]
    probing = settings.probe != "gradient"
    matrices: dict[str, MatrixProfile] = {}
    bases: dict[str, StoredBasis] = {}
    memory = {"gram_bytes_peak": 0, "gram_bytes_all_layers": 0, "basis_dtype": settings.basis_dtype}
    rates: dict[int, float] = {}      # layer mode: Δloss per unit of squared layer-output error
    local: dict[str, float] = {}      # squared layer-output error with one matrix at its probe rank
    total = len(layers)

    def visit(step):
        """Layer ``i``: Grams on the calibration stream (advanced while a later layer needs it), bases and
        error curves, then the Grams dropped; probes on the validation stream; bases stored in CPU memory."""
        i, prefix = step.index, step.prefix
        mods = dict(step.work.named_modules())
        mine = [li for li in wanted if li.layer == i]
        kept: dict[str, StoredBasis] = {}
        if i <= last:
            t0 = time.perf_counter()
            reps = {key: li.name[len(prefix):] for key, li in gram_representatives(mine).items()}
            grams, _ = step.grams("calib", {rel: key for key, rel in reps.items()}, list(range(len(calib.hidden))),
                                  keep_outputs=i < last)
            # the calibration stream moves on now (not needed past the last layer with a matrix)
            step.advance("calib", step.output("calib") if i < last else None)
            timings["calibration"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            gram_bytes = sum(g.gram.numel() * g.gram.element_size() for g in grams.values())
            memory["gram_bytes_peak"] = max(memory["gram_bytes_peak"], gram_bytes)
            memory["gram_bytes_all_layers"] += gram_bytes
            whitenings = {key: whitening(g) for key, g in grams.items()}
            solver, shared = methods.get(methods.basis_method()), {}   # the closed form with a basis: whitened
            for li in mine:
                rel = li.name[len(prefix):]
                basis = solver.basis(mods[rel].weight, whitenings[li.gram_key])
                kept[li.name] = StoredBasis.of(basis, basis.vectors.device, torch.float64, shared)  # no copy
                probe = max(1, min(rank_for_keep(li, settings.probe_keep), cands[li.name][0]))
                matrices[li.name] = MatrixProfile(li, cands[li.name], error_curve(basis.values), probe_rank=probe)
                del basis
            del grams, whitenings, shared   # this layer's Grams (and whitening factors) go here
            timings["spectra"] += time.perf_counter() - t0
        if probing:
            t0 = time.perf_counter()
            step.advance("val", _probe_layer(teacher, step, [matrices[li.name] for li in mine], kept, batches,
                                             teacher_loss, settings.probe, device, rates, local))
            timings["sensitivity"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        shared = {}
        for name, b in kept.items():
            bases[name] = b.to("cpu", dtype, shared)
        del kept, mods
        timings["spectra"] += time.perf_counter() - t0
        progress(i + 1, total, f"profile layer {i}: {len(mine)} matrices")

    streams = {**({"calib": calib} if calib is not None else {}), **({"val": inputs} if probing else {})}
    walk_layers(teacher, streams, visit, device=device, layers=None if probing else last + 1)
    matrices = {li.name: matrices[li.name] for li in wanted}   # linear_map order, as the greedy path expects
    bases = {name: bases[name] for name in matrices}
    if probing:
        if settings.probe == "layer":
            fallback = _median([r for r in rates.values() if r > 0])
            for m in matrices.values():
                rate = rates[m.info.layer]
                m.probe_delta = (rate if rate > 0 else fallback) * local[m.info.name]
                m.imputed = not rate > 0
        _set_sensitivities(matrices.values())
    else:
        t0 = time.perf_counter()
        _gradient_probe(teacher, matrices, bases, batches, settings.gradient_score, progress)
        timings["sensitivity"] += time.perf_counter() - t0
    memory["basis_bytes"] = sum(b.nbytes for b in bases.values())
    memory["factor_bytes"] = factor_bytes(bases.values())
    tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    return Profile(matrices, {}, bases, inputs, batches, teacher_loss, sum(len(b["input_ids"]) for b in batches),
                   tokens, timings, settings, memory)


def _probe_layer(teacher, step, mine: list, kept: dict, batches, teacher_loss: float, mode: str, device,
                 rates: dict, local: dict) -> list:
    """The layer / matrix probes of decoder layer ``step.index`` (a :class:`~lowrank_core.layerwise.LayerStep`:
    its plain view on the compute device) on the validation stream ``val`` entering it; returns the
    teacher's stream leaving it."""
    i, prefix, inputs = step.index, step.prefix, step.inputs["val"]
    out_t = step.output("val")
    if not mine:
        return out_t
    mods = dict(step.work.named_modules())
    reps = {m.info.name[len(prefix):]: low_rank_module(mods[m.info.name[len(prefix):]], kept[m.info.name],
                                                       m.probe_rank) for m in mine}
    for m in mine:
        rel = m.info.name[len(prefix):]
        out = step.run("val", {rel: reps[rel]})
        local[m.info.name] = _square_error(out, out_t, inputs)
        if mode == "matrix":
            m.probe_delta = suffix_loss(teacher, inputs, batches, i + 1, out, device=device) - teacher_loss
    if mode == "layer":
        out = step.run("val", reps)
        joint = _square_error(out, out_t, inputs)
        delta = suffix_loss(teacher, inputs, batches, i + 1, out, device=device) - teacher_loss
        rates[i] = delta / joint if joint > 0 and delta > 0 else math.nan
    return out_t


def _gradient_probe(teacher, matrices, bases, batches, kind, progress) -> None:
    """Fill ``scores`` and ``tail`` (the prediction) of every profile from one backward pass per
    validation example; ``probe_delta`` / ``sensitivity`` at the probe rank are reported, not used."""
    if not matrices:
        return
    result = gradient_scores(teacher, {name: bases[name] for name in matrices}, batches, progress)
    for name, m in matrices.items():
        m.scores = result.scores[name]
        m.tail = m.scores.tail(kind)
        m.probe_delta = m.predicted(m.probe_rank)
        err = m.error(m.probe_rank)
        m.sensitivity = m.probe_delta / err if err > 0 else 0.0


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
