"""The one compression pipeline (CLI, app, recipes and search call it): plan -> calibrated student.

``compress(teacher, tokenizer, plan, calib_examples, settings)``:

1. resolve the plan on the teacher's linears (method per rule, default ``settings.method``);
2. split the calibration examples into *fit* and *held-out* (``settings.valid_fraction``, by example);
3. factorise every assigned matrix — two paths:

   - fast (no sequential method, ``layerwise=False``): input Grams of the whole teacher on the fit
     and held-out batches (``calibrate.collect_grams``), then one factorisation per matrix, each shared
     Gram whitened once;
   - sequential, layer by layer (``layerwise=True``, always when a rule names a ``sequential`` method such
     as ``refit``): for each decoder layer, Grams of its linears are taken on the STUDENT's inputs (what
     the already-compressed earlier layers produce), the factors computed, refined by methods that
     refine (``Method.refine_layer``, e.g. the block-level refit of ``methods/refit.py``), and the
     student stream advanced (a ``layerwise.walk_layers`` callback, as is the fast path's hidden-MSE pass).
     Only one layer is on the compute device at a time (the 7B path);

4. build the student (``student.build_student``: teacher untouched, untouched tensors shared);
5. report each replaced matrix's relative output error on the held-out Grams, the per-layer hidden-state
   MSE between teacher and student on held-out batches, refit curves and timings.

Memory. The fast path holds every layer's Grams at once (float64 fit + float32 held-out): about 1.2 GB for
the 135M embedded model, but ~100 GB for a 7B model. The layer-by-layer path holds one layer's Grams
(Mistral-7B: 3 x 4096² + 14336² entries, ~2 GB float64 fit + ~1 GB float32 held-out), one layer's
weights on the compute device (``device``: e.g. ``cuda`` for a teacher kept on CPU, bf16: ~0.45 GB) and
three hidden-state streams (teacher in, teacher out, student; ``offload=True`` keeps them on CPU:
64 x 512 tokens x 4096 x 2 bytes = 0.27 GB each in bf16). Refit works on a float32 copy of one layer.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .linears import count_parameters, linear_map, weight_of
from .calibrate import PRECISIONS, GramStats, cheaper_as_outputs, collect_grams, output_key
from . import methods
from .data import batch_tokens, calibration_batches, split_examples
from .decompose import OutputCovariance, relative_output_error, whitening
from .layerwise import capture_layer_inputs, decoder_layers, final_norm, hidden_mse, walk_layers
from .lowrank import LowRankLinear
from .models import ModelSourceError, resolve_device
from .options import option
from .plan import Assignment, check_replaces_something, load_plan, resolve_plan
from .progress import Progress, ensure_progress
from .sliced import mark_part
from .student import build_student

__all__ = ["CompressSettings", "CompressResult", "CalibrationData", "calibration_data", "compress"]


@dataclass
class CompressSettings:
    """How to compress (defaults here only: CLI flags and recipe keys are derived from these fields).

    ``method_settings``: ``{method name: its settings}`` for every registered method that declares a
    ``settings_class`` (missing entries get that class's defaults); read one with :meth:`of`. Their flags are ``--<method>-<field>``, their recipe keys
    ``method.<method>.<key>`` (``options.py``, from the registry).
    """

    method: str = option("whitened", choices=methods.names, flag="--method", key="name",
                         help=lambda: "method for rules that name none: " + methods.help_text())
    calib: int = option(64, derived=True, help="calibration examples used (the first calib given)")
    max_len: int = option(512, minimum=8, help="tokens per calibration example (prompt + answer)")
    batch_size: int = option(4, minimum=1, help="calibration batch size (sequences)")
    valid_fraction: float = option(0.2, help="share of the calibration examples held out, for every method: "
                                             "per-matrix errors, hidden MSE and refit early stopping are measured "
                                             "on them")
    seed: int = option(0, derived=True, help="fit / held-out split seed (the data seed)")
    layerwise: bool = option(False, help="sequential layer-by-layer path: Grams on the student's inputs, one "
                                         "layer at a time (always on for a sequential method)")
    method_settings: dict = option(default_factory=methods.default_settings, sections=methods.settings_classes)
    device: Optional[str] = option(None, flag="--layer-device",
                                   help="compute device of the layer-by-layer path (e.g. cuda for a teacher on "
                                        "CPU: one layer on the GPU at a time, the 7B path); default: the model's")
    offload: bool = option(False, help="keep stored hidden states on CPU (big models)")
    hidden_mse: bool = option(True, help="measure per-layer hidden MSE on held-out batches (two extra passes "
                                         "in the fast path)")
    fit_errors: bool = option(False, help="also report each matrix's error on the fit tokens (rel_error_fit)")
    gram_precision: str = option("auto", choices=PRECISIONS,
                                 help="dtype of the calibration Gram products (sums stay float64): auto = bfloat16 "
                                      "on CUDA, float32 on CPU (bf16 is slower than float32 on CPUs without bf16 "
                                      "units); float64 = the reference")

    def __post_init__(self):
        given = dict(self.method_settings or {})
        self.method_settings = {**{n: s for n, s in methods.default_settings().items() if n not in given}, **given}

    def of(self, name: str):
        """The settings of method ``name`` (None for a method that declares none)."""
        methods.get(name)  # raises, naming the registered methods
        return self.method_settings.get(name)

    def for_data(self, calib: int, seed: int) -> "CompressSettings":
        """A copy with a job's calibration size and data seed; a method's settings with a ``seed`` field
        (derived: e.g. refit's shuffling seed) get the seed too."""
        own = {n: dataclasses.replace(s, seed=seed) if "seed" in {f.name for f in dataclasses.fields(s)} else s
               for n, s in self.method_settings.items()}
        return dataclasses.replace(self, calib=calib, seed=seed, method_settings=own)

    def validate_methods(self) -> None:
        """Each method's settings, checked by its method (``Method.validate_settings``)."""
        for name, settings in self.method_settings.items():
            methods.get(name).validate_settings(settings)

    def validate(self) -> None:
        methods.get(self.method)  # raises, naming the registered methods
        for name in ("calib", "max_len", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction {self.valid_fraction!r} must be in [0, 1)")
        self.validate_methods()
        if self.device is not None:
            resolve_device(self.device, "--layer-device (method.device)")  # unknown, or a CUDA device not here

    def to_dict(self) -> dict:
        """Every field, JSON-ready; each method's settings under its name (``"refit": {...}``)."""
        out = asdict(self)
        out.update(out.pop("method_settings"))
        return out


@dataclass
class CompressResult:
    student: nn.Module
    assignments: dict[str, Assignment]
    params_before: int
    params_after: int
    layers: list[dict]       # per replaced matrix: name, layer, module, rank, method, rel_error (held-out), ...
    hidden_mse: list[dict]   # per decoder layer: layer, mse, rel_mse (held-out batches, real tokens)
    refit_curves: dict[str, dict]
    timings: dict[str, float]
    split: dict = field(default_factory=dict)   # fit / held-out example and token counts
    settings: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # calibration too small to trust (calibration_warnings)

    @property
    def error_key(self) -> str:
        """``rel_error`` (held-out tokens) when any matrix has one, else ``rel_error_fit`` (nothing held out)."""
        return "rel_error" if any(r.get("rel_error") is not None for r in self.layers) else "rel_error_fit"

    def errors(self) -> list[float]:
        """Each replaced matrix's relative output error: held-out when measured, else on the fit tokens."""
        values = [r["rel_error"] if r.get("rel_error") is not None else r.get("rel_error_fit") for r in self.layers]
        return [v for v in values if v is not None]

    def to_dict(self) -> dict:
        """Everything but the student, JSON-ready."""
        return {"params_before": self.params_before, "params_after": self.params_after,
                "layers": self.layers, "hidden_mse": self.hidden_mse, "refit_curves": self.refit_curves,
                "timings": self.timings, "split": self.split, "settings": self.settings, "warnings": self.warnings}


# ----------------------------------------------------------------------------- factorisation helpers
def _low_rank(weight: torch.Tensor, bias, a: Assignment, gram: Optional[torch.Tensor], whitenings: dict,
              key: str) -> tuple[LowRankLinear, Optional[float]]:
    """Factor one weight by its method's closed form into a LowRankLinear on the weight's device and dtype;
    also the factors' relative error on the fitted statistics when the method knows it (``Factors.fit_error``)."""
    method = methods.get(a.method)
    if method.needs_grams and gram is not None and not isinstance(gram, OutputCovariance):
        gram = whitenings.setdefault(key, whitening(gram))  # one whitening per shared Gram (q/k/v, gate/up)
    factors = method.factorize(weight, a.rank, gram=gram if method.needs_grams else None, bias=bias)
    module = LowRankLinear.from_factors(factors, dtype=weight.dtype).to(weight.device)
    if a.info.rows:  # a part of a fused linear: build_student gathers the parts into a SlicedLinear
        mark_part(module, a.info.module, a.info.layout)
    return module, factors.fit_error


def _matrix_row(a: Assignment, weight: torch.Tensor, module: LowRankLinear, held: Optional[GramStats],
                fit: Optional[GramStats], fit_error: bool, known_fit_error: Optional[float] = None) -> dict:
    """One per-matrix row. ``rel_error``: held-out tokens; ``rel_error_fit``: fit tokens, computed when asked
    or when there is no held-out set (each costs float64 products with the Gram: not free for big models),
    unless the factorisation already knows it (``known_fit_error``: a whitened spectrum's tail)."""
    li = a.info
    row = {"name": li.name, "layer": li.layer, "module": li.module, "shape": f"{li.out_features} x {li.in_features}",
           "rank": a.rank, "method": a.method, "params_before": li.params, "params_after": a.params_after,
           "rel_error": None, "rel_error_fit": None, "fit_tokens": None if fit is None else int(fit.tokens)}
    held_error = held is not None and held.tokens
    fit_wanted = fit is not None and fit.tokens and (fit_error or not held_error)
    merged = module.merged_weight().detach() if held_error or (fit_wanted and known_fit_error is None) else None
    if held_error:
        row["rel_error"] = relative_output_error(weight, merged, held)
    if fit_wanted:
        row["rel_error_fit"] = known_fit_error if known_fit_error is not None else \
            relative_output_error(weight, merged, fit)
    return row


def statistics_plan(assignments: dict[str, Assignment]) -> tuple[list, set]:
    """(linears whose input Gram the fast path collects, names of the linears measured by their output
    covariance instead): per shared input, the outputs when every reader's method takes an output
    covariance and that costs fewer products (:func:`~lowrank_core.calibrate.cheaper_as_outputs`)."""
    readers: dict[str, list[Assignment]] = {}
    for a in assignments.values():
        readers.setdefault(a.info.gram_key, []).append(a)
    inputs, outputs = [], set()
    for group in readers.values():
        infos = [a.info for a in group]
        # a refining method changes its factors after the closed form: their errors need the input Gram
        if all(methods.get(a.method).output_covariance and not methods.get(a.method).refines for a in group) \
                and not any(i.rows for i in infos) and cheaper_as_outputs(infos):  # a part's output: not hooked
            outputs.update(i.name for i in infos)
        else:
            inputs.extend(infos)
    return inputs, outputs


def _statistic(stats: dict, a: Assignment, outputs: set):
    """The statistic of one matrix from :func:`collect_grams`'s result: its input ``GramStats`` or its
    ``OutputCovariance`` (None when not collected)."""
    if a.info.name in outputs:
        g = stats.get(output_key(a.info))
        return None if g is None else OutputCovariance(g.gram, g.tokens)
    return stats.get(a.info.gram_key)


# ----------------------------------------------------------------------------- the pipeline
@dataclass
class CalibrationData:
    """The calibration examples of a run as batches: *fit* (Grams, refit training) and *held-out*
    (errors, early stopping), split by example (``settings.valid_fraction``, ``settings.seed``)."""

    fit: list[dict]
    held_out: list[dict]
    info: dict     # examples, fit_examples, held_out_examples, fit_tokens, held_out_tokens


def calibration_data(tokenizer, calib_examples: Sequence, settings: CompressSettings) -> CalibrationData:
    """The first ``settings.calib`` examples as fit / held-out batches, exactly as :func:`compress` uses
    them (rank allocation calls this too, so its Grams and students match)."""
    examples = list(calib_examples)[: settings.calib]
    fit_ex, held_ex = split_examples(examples, settings.valid_fraction, settings.seed)
    fit_b = calibration_batches(tokenizer, fit_ex, settings.batch_size, settings.max_len)
    held_b = calibration_batches(tokenizer, held_ex, settings.batch_size, settings.max_len)
    if examples and not fit_b:
        raise ValueError(f"no calibration example fits max_len={settings.max_len}; raise max_len")
    info = {"examples": len(examples), "fit_examples": len(fit_ex), "held_out_examples": len(held_ex),
            "fit_tokens": batch_tokens(fit_b), "held_out_tokens": batch_tokens(held_b)}
    return CalibrationData(fit_b, held_b, info)


MIN_HELD_OUT_EXAMPLES = 2
MIN_HELD_OUT_TOKENS = 256


def _names(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


def calibration_warnings(info: dict, assignments: dict[str, Assignment]) -> list[str]:
    """What makes a run untrustworthy, known once the batches are built (``info``: :class:`CalibrationData`'s):
    fit Grams of fewer tokens than their input dimension (rank-deficient: a whitened factorisation fits the
    few tokens seen and collapses on others) and a tiny held-out set (its errors and hidden MSE are noise)."""
    out = []
    fit_tokens = info.get("fit_tokens", 0)
    short: dict[int, dict[str, list[str]]] = {}  # inputs -> gram key -> matrices
    for name, a in assignments.items():
        if methods.get(a.method).needs_grams and a.info.in_features > fit_tokens:
            short.setdefault(a.info.in_features, {}).setdefault(a.info.gram_key, []).append(name)
    for inputs, keys in sorted(short.items(), reverse=True):
        matrices = [n for names in keys.values() for n in names]
        out.append(f"{len(keys)} fit Gram(s) hold fewer tokens than their {inputs:,} inputs: {fit_tokens:,} tokens "
                   f"from {info.get('fit_examples', 0)} fit example(s) (Grams {_names(list(keys))}; matrices "
                   f"{_names(matrices)}): rank-deficient statistics, the factors fit those tokens only: add "
                   f"calibration examples (or raise max_len if it cuts them) until the fit side holds more than "
                   f"{inputs:,} tokens")
    held_ex, held_tokens = info.get("held_out_examples", 0), info.get("held_out_tokens", 0)
    if assignments and (held_ex < MIN_HELD_OUT_EXAMPLES or held_tokens < MIN_HELD_OUT_TOKENS):
        what = (f"{held_ex} example(s) of {held_tokens:,} tokens" if held_ex else
                "empty: errors are measured on the fit tokens themselves (optimistic)")
        out.append(f"the held-out check is {what} (under {MIN_HELD_OUT_EXAMPLES} examples or "
                   f"{MIN_HELD_OUT_TOKENS} tokens): its relative errors and hidden MSE say little; add "
                   "calibration examples or raise the held-out fraction")
    return out


def expert_warnings(rows: Sequence[dict], assignments: dict[str, Assignment]) -> list[str]:
    """Experts whose fit Grams hold fewer routed tokens than their inputs (rows: :func:`_matrix_row`'s, with
    ``fit_tokens``): the router sent them too few calibration tokens for a Gram-based method to be trusted."""
    short: dict[str, tuple[int, int]] = {}   # expert module -> (fit tokens, inputs)
    for row in rows:
        a = assignments.get(row["name"])
        if a is None or a.info.expert is None or not methods.get(a.method).needs_grams:
            continue
        tokens = row.get("fit_tokens")
        if tokens is not None and tokens < a.info.in_features:
            expert = row["name"].rsplit(".", 1)[0]
            short[expert] = min(short.get(expert, (tokens, a.info.in_features)), (tokens, a.info.in_features))
    if not short:
        return []
    shown = _names([f"{name} ({t:,} tokens < {n:,} inputs)" for name, (t, n) in short.items()])
    return [f"{len(short)} expert(s) were routed fewer fit tokens than their inputs: {shown}: rank-deficient "
            "statistics, their factors fit those tokens only: add calibration examples (the router decides how "
            "many reach each expert) or leave those experts dense"]


def compress(teacher: nn.Module, tokenizer, plan, calib_examples: Sequence, settings: Optional[CompressSettings] = None,
             progress: Optional[Progress] = None, warn: Optional[Callable[[str], None]] = None) -> CompressResult:
    """Compress ``teacher`` by ``plan`` with calibration on ``calib_examples``; see the module docstring.
    ``warn(message)`` hears each of :func:`calibration_warnings` before the long work starts, and the
    :func:`expert_warnings` (experts the router sent too few tokens) once the Grams are summed (all are
    also the result's ``warnings``)."""
    settings = settings or CompressSettings()
    settings.validate()
    progress = ensure_progress(progress)
    start = time.perf_counter()
    factorized = next((name for name, m in teacher.named_modules() if isinstance(m, LowRankLinear)), None)
    if factorized is not None:
        raise ModelSourceError(f"the teacher is already factorized ({factorized} is a LowRankLinear): a factorized "
                               "lowrank export cannot be compressed again; compress its base model")
    linears = linear_map(teacher, parts=True)
    plan = load_plan(plan)
    assignments = resolve_plan(plan, linears, settings.method)
    check_replaces_something(plan, assignments)
    chosen = {a.method: methods.get(a.method) for a in assignments.values()}  # unknown names raise here
    examples = list(calib_examples)[: settings.calib]
    if not examples and assignments:
        raise ValueError("compress needs at least one calibration example")
    progress(0, 1, "preparing calibration batches")
    calib = calibration_data(tokenizer, examples, settings)
    fit_b, held_b, split = calib.fit, calib.held_out, calib.info
    progress(1, 1, f"preparing calibration batches: {split['fit_tokens']:,} fit + {split['held_out_tokens']:,} "
                   "held-out tokens")
    found = calibration_warnings(split, assignments)
    for message in found:
        (warn or (lambda m: None))(message)
    sequential = settings.layerwise or any(m.sequential for m in chosen.values())
    run = _sequential if sequential else _fast
    replacements, rows, mse_rows, curves, timings = run(teacher, assignments, fit_b, held_b, settings, progress)
    for message in expert_warnings(rows, assignments):   # routed token counts are known once the Grams are
        found.append(message)
        (warn or (lambda m: None))(message)
    student = build_student(teacher, replacements)
    timings["total"] = time.perf_counter() - start
    return CompressResult(student=student, assignments=assignments, params_before=count_parameters(teacher),
                          params_after=count_parameters(student), layers=rows, hidden_mse=mse_rows,
                          refit_curves=curves, timings=timings, split={**split, "path": "layerwise" if sequential else "fast"},
                          settings=settings.to_dict(), warnings=found)


def _fast(teacher, assignments, fit_b, held_b, settings, progress):
    """Whole-model Grams on the teacher's inputs, then factorise every matrix."""
    timings = {"calibration": 0.0, "decomposition": 0.0, "refit": 0.0}
    t0 = time.perf_counter()
    need_fit = settings.fit_errors or not held_b or any(methods.get(a.method).needs_grams
                                                         for a in assignments.values())
    unpad = next(teacher.parameters()).device.type == "cpu"  # collect_grams forwards each example alone there
    held_p, fit_p = _pieces_of(held_b, unpad), _pieces_of(fit_b, unpad) if need_fit else []
    bar = _Counter(progress, len(held_p) + len(fit_p), "calibration Grams: example")
    bar.report("starting")
    inputs, outputs = statistics_plan(assignments)
    out_infos = [a.info for a in assignments.values() if a.info.name in outputs]

    def grams(pieces, side):
        return collect_grams(teacher, pieces, inputs, progress=bar.side(side), outputs=out_infos,
                             precision=settings.gram_precision) if pieces else {}
    # held-out Grams only measure errors: kept in float32 (half the memory); the fit Grams stay float64
    held_g = {k: GramStats(g.gram.float(), g.tokens) for k, g in grams(held_p, "held-out").items()}
    fit_g = grams(fit_p, "fit")
    timings["calibration"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    last_use = {a.info.gram_key: name for name, a in assignments.items()}
    replacements, rows, whitenings = {}, [], {}
    for k, (name, a) in enumerate(assignments.items()):
        weight, bias = weight_of(teacher, a.info)
        key = a.info.gram_key
        fit = _statistic(fit_g, a, outputs)
        new, known = _low_rank(weight, bias, a, getattr(fit, "gram", fit), whitenings, key)
        replacements[name] = new
        rows.append(_matrix_row(a, weight, new, _statistic(held_g, a, outputs), fit, settings.fit_errors, known))
        fit_g.pop(output_key(a.info), None), held_g.pop(output_key(a.info), None)
        if last_use[key] == name:  # free this input's statistics as soon as its last reader is done
            fit_g.pop(key, None), held_g.pop(key, None), whitenings.pop(key, None)
        progress(k + 1, len(assignments), f"factorising {name}")
    timings["decomposition"] = time.perf_counter() - t0
    mse_rows = []
    if settings.hidden_mse and held_b and assignments:
        t0 = time.perf_counter()
        mse_rows = _stream_mse(teacher, replacements, held_b, settings, progress)
        timings["hidden_mse"] = time.perf_counter() - t0
    return replacements, rows, mse_rows, {}, timings


def _pieces_of(batches: list[dict], unpad: bool) -> list[dict]:
    """``batches`` cut into what ``collect_grams`` forwards anyway (each padded batch's rows without their
    padding when ``unpad``): the same Grams, with a progress report per example instead of per batch."""
    if not unpad:
        return list(batches)
    out = []
    for b in batches:
        mask = b["attention_mask"]
        if bool(mask.all()) or not all(bool(mask[r, :int(mask[r].sum())].all()) for r in range(mask.shape[0])):
            out.append(b)
            continue
        for r in range(mask.shape[0]):
            n = int(mask[r].sum())
            if n:
                out.append({k: v[r:r + 1, :n] if torch.is_tensor(v) and v.dim() == 2 else v for k, v in b.items()})
    return out


class _Counter:
    """One progress bar over several calls that each count from 1 (e.g. held-out then fit Grams)."""

    def __init__(self, progress: Progress, total: int, message: str):
        self.progress, self.total, self.message, self.done = progress, total, message, 0

    def report(self, note: str) -> None:
        self.progress(self.done, self.total, f"{self.message} {self.done} ({note})")

    def side(self, note: str) -> Progress:
        start = self.done

        def report(done, _total, _message=""):
            self.done = start + done
            self.report(note)
        return report


def _stream_mse(teacher, replacements, batches, settings, progress) -> list[dict]:
    """Per-layer hidden MSE of the student vs the teacher on ``batches`` (a student built on the fly):
    a :func:`~lowrank_core.layerwise.walk_layers` callback over a teacher and a student stream."""
    rows = []
    width = teacher.config.hidden_size
    total = len(decoder_layers(teacher))

    def visit(step):
        local = {n[len(step.prefix):]: m for n, m in replacements.items() if n.startswith(step.prefix)}
        yt, xs = step.output("teacher"), step.run("student", local)
        rows.append({"layer": step.index, **hidden_mse(xs, yt, step.inputs["teacher"].masks, width)})
        progress(step.index + 1, total, f"hidden MSE layer {step.index}")
        return {"teacher": yt, "student": xs}

    walk_layers(teacher, {"teacher": batches, "student": batches}, visit, device=settings.device,
                store_device="cpu" if settings.offload else None, progress=progress)
    return rows


def _sequential(teacher, assignments, fit_b, held_b, settings, progress):
    """Layer by layer on the student's stream (a :func:`~lowrank_core.layerwise.walk_layers` callback);
    see the module docstring."""
    timings = {"calibration": 0.0, "decomposition": 0.0, "refit": 0.0}
    t0 = time.perf_counter()
    store = "cpu" if settings.offload else None
    progress(0, len(fit_b) + len(held_b), "embedding calibration batches")
    inputs = capture_layer_inputs(teacher, fit_b + held_b, store_device=store, progress=progress)
    fit_idx = list(range(len(fit_b)))
    held_idx = list(range(len(fit_b), len(fit_b) + len(held_b)))
    timings["calibration"] += time.perf_counter() - t0
    total = len(decoder_layers(teacher))
    width = teacher.config.hidden_size
    replacements, rows, mse_rows, curves = {}, [], [], {}

    def visit(step):
        i, work, device, prefix = step.index, step.work, step.device, step.prefix
        home = next(step.layer.parameters()).device
        local = {n[len(prefix):]: a for n, a in assignments.items() if n.startswith(prefix)}
        xt, xs = step.hidden["teacher"], step.hidden["student"]
        t0 = time.perf_counter()
        if not local:
            yt = step.output("teacher")
            xs = step.output("student")
            timings["calibration"] += time.perf_counter() - t0
        else:
            _, measured_out = statistics_plan(local)
            names = {a.info.path[len(prefix):]: a.info.gram_key for a in local.values()
                     if a.info.name not in measured_out}
            out_names = {rel: output_key(a.info) for rel, a in local.items() if a.info.name in measured_out}
            # Grams on the student's stream; while it still equals the teacher's, one pass gives both
            fit_g, held_g = step.grams("student", names, fit_idx, keep_outputs=step.same("teacher", "student"),
                                       outputs=out_names, precision=settings.gram_precision)
            yt = step.output("teacher")
            timings["calibration"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            new, whitenings = {}, {}
            for rel, a in local.items():
                weight, bias = weight_of(work, a.info, prefix)
                fit = _statistic(fit_g, a, measured_out)
                new[rel], _ = _low_rank(weight, bias, a, getattr(fit, "gram", fit), whitenings, a.info.gram_key)
            timings["decomposition"] += time.perf_counter() - t0
            ctx = methods.LayerContext(work, i, new, inputs, xt, xs, yt, fit_idx, held_idx, settings, device)
            for method in dict.fromkeys(methods.get(a.method) for a in local.values()):
                if not method.refines:
                    continue
                names = [rel for rel, a in local.items() if a.method == method.name]
                t0 = time.perf_counter()
                curve = method.refine_layer(ctx, names, _within(progress, i, total))
                if curve is not None:
                    curves[f"layer {i}" if f"layer {i}" not in curves else f"layer {i} {method.name}"] = curve
                timings["refit"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            xs = step.run("student", new)
            timings["calibration"] += time.perf_counter() - t0
            for rel, a in local.items():
                rows.append(_matrix_row(a, weight_of(work, a.info, prefix)[0], new[rel], _statistic(held_g, a, measured_out),
                                        _statistic(fit_g, a, measured_out), settings.fit_errors))
                replacements[prefix + rel] = new[rel].to(home)
        mse_idx = held_idx or fit_idx
        mse = hidden_mse([xs[b] for b in mse_idx], [yt[b] for b in mse_idx], [inputs.masks[b] for b in mse_idx], width)
        mse_rows.append({"layer": i, **mse, "on": "held-out" if held_idx else "fit"})
        progress(i + 1, total, f"layer {i}: hidden rel MSE {mse['rel_mse']:.3g}", stage="layer",
                 metrics={"hidden_rel_mse": mse["rel_mse"]})
        return {"teacher": yt, "student": xs}

    xs = walk_layers(teacher, {"teacher": inputs, "student": inputs}, visit, device=settings.device)["student"]
    head = {n: a for n, a in assignments.items() if a.info.layer is None}
    for name, a in head.items():
        rows.append(_head(teacher, name, a, inputs, xs, fit_idx, held_idx, replacements, timings, settings))
    return replacements, rows, mse_rows, curves, timings


def _head(teacher, name, a, inputs, xs, fit_idx, held_idx, replacements, timings, settings) -> dict:
    """lm_head: Grams of the final-norm output of the student stream (``refit`` falls back to whitened)."""
    t0 = time.perf_counter()
    head = dict(teacher.named_modules())[name]
    norm = final_norm(teacher)
    device = head.weight.device

    def grams(idx):
        total = GramStats.zeros(head.in_features, device=device)
        with torch.no_grad():
            for b in idx:
                total.add_(norm(xs[b].to(device)), inputs.masks[b])
        return total

    fit, held = grams(fit_idx), grams(held_idx) if held_idx else None
    timings["calibration"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    new, _ = _low_rank(head.weight.detach(), head.bias, a, fit.gram if fit else None, {}, a.info.gram_key)
    replacements[name] = new
    timings["decomposition"] += time.perf_counter() - t0
    row = _matrix_row(a, head.weight.detach(), new, held, fit, settings.fit_errors)
    if methods.get(a.method).refines:
        row["note"] = f"lm_head: {a.method}'s closed-form factors ({a.method} refines decoder layers only)"
    return row


def _within(progress: Progress, done: int, total: int) -> Progress:
    """A progress callback that reports sub-steps as messages of step ``done`` of ``total`` (one bar: stage
    ``layer``), their metrics passed on."""
    return lambda d, t, message="", stage="", metrics=None: progress(done, total, f"{message} ({d}/{t})",
                                                                       stage="layer", metrics=metrics)
