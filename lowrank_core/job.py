"""One compression job — load, split, compress, evaluate, export — behind the CLI, recipes and the app.

A :class:`JobSpec` says everything a job needs (its sections are the recipe's sections and the
``compress`` command's flags, both derived from these dataclasses by ``options.py``);
:func:`run_job` runs it and returns a :class:`JobResult`, whose :meth:`~JobResult.manifest` is the one
manifest every export carries. The app calls the same pieces on a model and a split it keeps cached:
``run_job(spec, loaded=..., split=...)``, then :func:`evaluate_job` and :func:`export_job`.
Output paths and every option are checked before any model is loaded.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .linears import count_parameters
from .compare import CompareSettings, Comparison, compare_models
from .compress import CompressResult, CompressSettings, compress
from .data import Split, make_split
from .evaluate import default_batch_size
from .export import (FORMATS, RECORDS_BYTES, ExportResult, ExportVerificationError, ExportWriteError, build_manifest,
                     check_room, check_target, export_bytes, export_student)
from .heal import HealResult, HealSettings, heal
from .models import (DEVICES, DTYPES, LoadedModel, load_config, load_model, refuse_factorized,
                     resolve_device)
from .options import OptionError, checked, option, to_mapping
from .paths import check_output_folder
from .plan import Accounting, Plan, account, check_replaces_something, load_plan
from .progress import Progress, ensure_progress, staged
from .rescue import WriteFailed, fail, rescue
from .threads import runtime_record


@dataclass
class ModelSpec:
    """The teacher."""

    source: str = option("default", flag="--model", help="'default', a model folder, .gguf, config.json "
                                                         "(accounting only), hub id or tiny")
    dtype: str = option("float32", choices=tuple(DTYPES), help="weight dtype")
    device: str = option("auto", choices=DEVICES, pattern=r"cuda:\d+", help="auto, cpu, cuda or cuda:N")


@dataclass
class DataSpec:
    """The honest split: calibration (and validation) examples; evaluation examples, never seen before."""

    source: str = option("default", flag="--data", help="'default' (ShareGPT), 'chatterbot', a local "
                                                        ".parquet/.jsonl/.json (OpenOrca columns) or hub id")
    seed: int = option(0, minimum=0, help="split seed (also the fit / held-out split of calibration)")
    calib: int = option(64, minimum=1, help="calibration examples (calib side of the split)")
    eval: int = option(200, minimum=0, help="evaluation examples scored (eval side); 0 skips evaluation")
    val: int = option(0, minimum=0, help="validation examples (calib side's validation share)")


@dataclass
class EvalSpec:
    """How teacher and student are scored on the evaluation examples."""

    examples: Optional[int] = option(None, minimum=1, help="scored examples (default: data.eval)")
    batch_size: Optional[int] = option(None, minimum=1, help="examples per forward pass (default: 1 on CPU, 8 "
                                                             "on CUDA)")
    max_len: Optional[int] = option(None, minimum=8, help="tokens per example (default: the calibration max_len)")
    margin: str = option(CompareSettings.margin, help="equivalence margin of the paired comparison: nats (0.02) or "
                                                      "percent of the teacher loss ('1%')")
    teacher_cache: str = option(CompareSettings.teacher_cache, help="the teacher's results reused across "
                                "evaluations: a folder, 'auto' (the cache dir's teacher/) or 'off'")

    def compare_settings(self, examples: int, batch_size: int, max_len: int) -> CompareSettings:
        return CompareSettings(examples=examples, batch_size=batch_size, max_len=max_len, margin=self.margin,
                               teacher_cache=self.teacher_cache)


@dataclass
class ExportSpec:
    """Where and how the student is written (verified by reloading before it lands)."""

    dir: str = option(flag="--export", help="write the student to this folder")
    format: str = option("dense", choices=FORMATS, help="dense (merged, plain transformers) or factorized "
                                                        "(smaller)")
    force: bool = option(False, help="replace an existing export folder")
    verify: bool = option(True, help="reload the export and compare logits before it lands")
    verify_examples: int = option(16, minimum=0, help="evaluation examples whose loss is also compared after reload")


@dataclass
class JobSpec:
    """A whole job. ``method`` holds the compression settings (its ``calib`` and ``seed`` come from
    ``data``: see :meth:`settings`)."""

    plan: Plan
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    method: CompressSettings = field(default_factory=CompressSettings)
    heal: HealSettings = field(default_factory=HealSettings)
    evaluate: EvalSpec = field(default_factory=EvalSpec)
    export: Optional[ExportSpec] = None
    name: Optional[str] = None
    description: str = ""

    def __post_init__(self):
        self.plan = load_plan(self.plan)
        self.method = self.settings()  # the derived fields (calibration size, seeds) follow the data section
        self.heal = dataclasses.replace(self.heal, seed=self.data.seed)

    def settings(self) -> CompressSettings:
        """The compression settings with the data section's calibration size and seed (also the seed of
        each method's settings that has one: ``CompressSettings.for_data``)."""
        return self.method.for_data(self.data.calib, self.data.seed)

    @property
    def eval_examples(self) -> int:
        return self.evaluate.examples or self.data.eval

    @property
    def calib_examples(self) -> int:
        """Calibration-side examples the split must hold: for the Grams and for healing."""
        return max(self.data.calib, self.heal.examples if self.heal.enabled else 0)

    def validate(self) -> None:
        """Every check that needs no weights: settings, evaluation size, devices, a plan that replaces
        something, a teacher that is not already factorized, the export target and its parent folder."""
        if self.evaluate.examples is not None and self.evaluate.examples > self.data.eval:
            raise OptionError(f"evaluate.examples: {self.evaluate.examples} is more than the split's data.eval = "
                              f"{self.data.eval} examples")
        checked("method", self.settings().validate)
        checked("heal", self.heal.validate)
        checked("evaluate", self.evaluate.compare_settings(1, 1, 8).validate)
        resolve_device(self.model.device, "model.device")
        refuse_factorized(self.model.source)
        check_replaces_something(self.plan)
        if self.export is not None:
            check_output_folder(self.export.dir, "export target")
            check_target(Path(self.export.dir), self.export.force)

    def to_dict(self) -> dict:
        """The recipe form (``load_recipe`` reads it back to an equal spec)."""
        return {"name": self.name, "description": self.description, "model": to_mapping(self.model),
                "data": to_mapping(self.data), "plan": self.plan.to_dict(), "method": to_mapping(self.method),
                "heal": to_mapping(self.heal), "evaluate": to_mapping(self.evaluate),
                "export": to_mapping(self.export) if self.export is not None else None}


@dataclass
class JobResult:
    """What a job produced. ``evaluation``: {"teacher", "student"} EvalResults ({} when not scored);
    ``comparison``: the paired comparison behind them (``Comparison``), None when not scored."""

    spec: JobSpec
    loaded: LoadedModel
    split: Split
    compressed: CompressResult
    accounting: Accounting
    evaluation: dict = field(default_factory=dict)
    comparison: Optional[Comparison] = None
    healed: Optional[HealResult] = None
    export: Optional[ExportResult] = None
    seconds: dict = field(default_factory=dict)
    runtime: dict = field(default_factory=runtime_record)  # threads, thread policy, versions (at compress time)

    @property
    def student(self):
        return self.compressed.student

    def manifest(self) -> dict:
        """The caller's part of every export's ``lowrank.json``: job, source, plan, method, split,
        metrics, per-matrix errors and parameter accounting (the one manifest builder)."""
        ev = self.evaluation
        return build_manifest(
            source=self.loaded.name, fingerprint=self.loaded.fingerprint, plan=self.spec.plan,
            method=self.spec.method.method, settings=self.spec.settings(), split=self.split.info,
            teacher_metrics=ev.get("teacher"), student_metrics=ev.get("student"), job=self.spec.to_dict(),
            layers=self.compressed.layers, heal=_heal_summary(self.healed), comparison=self.comparison_summary(),
            threads=self.runtime.get("threads"), runtime=self.runtime,
            accounting={k: v for k, v in self.accounting.to_dict().items() if k != "matrices"})

    def keep_comparison(self, comparison: Comparison) -> None:
        """Keep ``comparison`` (e.g. the same scores judged at another margin) and its two EvalResults:
        what the manifest, the model card and ``to_dict`` report."""
        self.comparison = comparison
        self.evaluation = {side: comparison.eval_result(side) for side in ("teacher", "student")}

    def comparison_summary(self) -> Optional[dict]:
        """The paired comparison's report (``Comparison.summary``), None when the job was not scored."""
        return self.comparison.summary() if self.comparison is not None else None

    def to_dict(self) -> dict:
        """JSON-ready record (what ``compress --json`` and ``run --json`` print)."""
        ev = {k: v.to_dict() for k, v in self.evaluation.items()}
        t, s = ev.get("teacher"), ev.get("student")
        c = self.compressed
        return {"name": self.spec.name, "job": self.spec.to_dict(), "model": self.loaded.name,
                "model_fingerprint": self.loaded.fingerprint, "dtype": self.loaded.dtype,
                "device": self.loaded.device, "data": self.spec.data.source, "plan": self.spec.plan.to_dict(),
                "method": self.spec.method.method, "params_before": c.params_before,
                "params_after": c.params_after, "ratio": c.params_after / c.params_before,
                "accounting": self.accounting.to_dict(), "split": self.split.info.to_dict(),
                "teacher": t, "student": s, "teacher_loss": t["loss"] if t else None,
                "student_loss": s["loss"] if s else None, "evaluation": ev,
                "comparison": self.comparison_summary(), "compress": c.to_dict(),
                "heal": self.healed.to_dict() if self.healed is not None else None,
                "export": self.export.to_dict() if self.export is not None else None, "seconds": self.seconds,
                "threads": self.runtime.get("threads"), "runtime": self.runtime}


def _heal_summary(healed: Optional[HealResult]) -> Optional[dict]:
    """What a manifest says of healing: tokens, steps, validation loss before / after (no per-step curve)."""
    if healed is None:
        return None
    return {k: v for k, v in healed.to_dict().items() if k != "curve"}


def _phase(progress: Progress, name: str) -> Progress:
    return staged(progress, name, f"{name}: ")


class _Laps:
    def __init__(self):
        self.seconds: dict = {}
        self.start = self.last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
        self.last = now


def dry_run(spec: JobSpec) -> Accounting:
    """The plan's exact parameter accounting from the model's config alone (no weights loaded)."""
    return account(load_config(spec.model.source), spec.plan, spec.method.method)


def run_job(spec: JobSpec, progress: Optional[Progress] = None, log: Optional[Callable[[str], None]] = None,
            loaded: Optional[LoadedModel] = None, split: Optional[Split] = None, evaluate: bool = True,
            export: bool = True) -> JobResult:
    """Run ``spec``: load (unless ``loaded``), split (unless ``split``: the app passes the ones it keeps),
    compress, score teacher and student on the first ``spec.eval_examples`` of the split's evaluation
    examples, export when ``spec.export`` is set (``evaluate`` / ``export`` False: leave those phases to
    :func:`evaluate_job` / :func:`export_job`, as the app does). ``log(message)`` is told when each phase
    starts. Everything checkable without weights is checked first."""
    spec.validate()
    progress, say = ensure_progress(progress), log or (lambda message: None)
    laps = _Laps()
    if loaded is None:
        m = spec.model
        say(f"loading model {m.source} ({m.dtype}, device {m.device})")
        loaded = load_model(m.source, dtype=m.dtype, device=m.device)
        laps("load")
    accounting = account(loaded.model, spec.plan, spec.method.method)
    if export and spec.export is not None:  # a disk without room fails now, not after the work
        check_room(Path(spec.export.dir).expanduser().absolute(),
                   planned_export_bytes(loaded.model, accounting, spec.export.format), spec.export.format)
    if split is None:
        d = spec.data
        say(f"split of {d.source}: {spec.calib_examples} calibration / {d.eval} evaluation examples, seed {d.seed}")
        split = make_split(d.source, n_calib=spec.calib_examples, n_eval=d.eval, n_val=d.val, seed=d.seed)
        laps("data")
    settings = spec.settings()
    say(f"compressing {len(accounting.rows)} matrices with {settings.method}")
    compressed = compress(loaded.model, loaded.tokenizer, spec.plan, split.calib, settings,
                          progress=_phase(progress, "compress"), warn=lambda message: say(f"warning: {message}"))
    laps("compress")
    result = JobResult(spec, loaded, split, compressed, accounting, seconds=laps.seconds)
    if spec.heal.enabled:
        say(f"healing on {spec.heal.tokens:,} tokens ({spec.heal.loss})")
        heal_job(result, progress=_phase(progress, "heal"))
        laps("heal")
    if evaluate and spec.eval_examples:
        say(f"evaluating teacher and student on {spec.eval_examples} examples")
        evaluate_job(result, progress=_phase(progress, "evaluate"))
        laps("evaluate")
    if export and spec.export is not None:
        say(f"exporting {spec.export.format} to {spec.export.dir}")
        export_job(result, spec.export, progress=_phase(progress, "export"))
        laps("export")
    laps.seconds["total"] = time.perf_counter() - laps.start
    return result


def heal_job(result: JobResult, progress: Optional[Progress] = None) -> HealResult:
    """Heal the job's student in place on the first ``heal.examples`` (default ``data.calib``) examples of
    the split's calibration side; stores and returns the HealResult."""
    spec = result.spec
    n = spec.heal.examples or spec.data.calib
    if len(result.split.calib) < n:
        raise ValueError(f"healing needs {n} calibration-side examples, the split holds {len(result.split.calib)}")
    result.healed = heal(result.loaded.model, result.student, result.loaded.tokenizer, result.split.calib[:n],
                         spec.heal, progress=progress)
    return result.healed


def evaluate_job(result: JobResult, n: Optional[int] = None, batch_size: Optional[int] = None,
                 progress: Optional[Progress] = None, margin: Optional[str] = None,
                 max_len: Optional[int] = None, until_decided: bool = False) -> Comparison:
    """The paired comparison of teacher and student on the same batches of the first ``n`` (default
    ``spec.eval_examples``) evaluation examples of the split (those whose prompt fills max_len, default
    :func:`eval_max_len`, are counted as skipped), judged at ``margin`` (default ``spec.evaluate.margin``);
    ``until_decided``: ``n`` is the maximum and the pass ends at the first look the group-sequential TOST
    decides (``CompareSettings.until_decided``). Returns the Comparison; stores it and its {"teacher",
    "student"} EvalResults on the job
    (:meth:`JobResult.keep_comparison`) unless it was stopped before any example was scored."""
    spec = result.spec
    comparison = paired_evaluation(result.loaded, result.student, result.split.eval, spec.evaluate,
                                   n or spec.eval_examples, max_len or eval_max_len(spec), batch_size=batch_size,
                                   margin=margin, progress=progress, until_decided=until_decided)
    if comparison.examples or not comparison.stopped:
        result.keep_comparison(comparison)
    return comparison


def paired_evaluation(loaded: LoadedModel, student, examples, evaluate: EvalSpec, n: int, max_len: int,
                      batch_size: Optional[int] = None, margin: Optional[str] = None,
                      progress: Optional[Progress] = None, until_decided: bool = False) -> Comparison:
    """Teacher and ``student`` on the same batches of the first ``n`` ``examples``: the one evaluation of
    a built student (jobs, searches, the Evaluate page), with ``evaluate``'s batch size (default: 1 on
    CPU, 8 on CUDA) and margin unless given here."""
    batch_size = batch_size or evaluate.batch_size or default_batch_size(loaded.device)
    settings = evaluate.compare_settings(n, batch_size, max_len)
    if margin is not None:
        settings = dataclasses.replace(settings, margin=str(margin))
    settings = dataclasses.replace(settings, until_decided=bool(until_decided))
    return compare_models(loaded.model, {"student": student}, loaded.tokenizer, examples[:n], settings,
                          progress=progress)["student"]


def eval_max_len(spec: JobSpec) -> int:
    return spec.evaluate.max_len or spec.method.max_len


def export_job(result: JobResult, export: ExportSpec, progress: Optional[Progress] = None) -> ExportResult:
    """Write the job's student with its manifest, verified on the first ``export.verify_examples``
    evaluation examples; stores and returns the ExportResult. Any failure but a failed verification (a
    full disk, a concurrent writer, a bug) writes the student unverified to a rescue folder with room
    (:mod:`.rescue`) and raises, naming the target, the cause and the rescue."""
    def write(spec: ExportSpec, bar: Optional[Progress]) -> ExportResult:
        return export_student(result.student, result.loaded.tokenizer, spec.dir, spec.format, result.manifest(),
                              force=spec.force, verify=spec.verify,
                              eval_examples=result.split.eval[: spec.verify_examples] or None, progress=bar)

    try:
        result.export = write(export, progress)
        return result.export
    except ExportVerificationError:
        raise
    except Exception as e:  # noqa: BLE001 - minutes or hours of work must not be lost to a late write failure
        cause = e.__cause__ if isinstance(e, ExportWriteError) and e.__cause__ is not None else e
    what, name = f"the {export.format} export", result.spec.name or "job"
    needed = export_bytes(result.student, export.format)
    try:
        kept, result.export = rescue(name, needed, lambda path: write(
            dataclasses.replace(export, dir=str(path), force=False, verify=False), None))
    except WriteFailed as lost:
        fail(what, export.dir, cause, None, lost=str(lost), error_class=ExportWriteError)
    fail(what, export.dir, cause, kept, how=" unverified", error_class=ExportWriteError)


def planned_export_bytes(model, accounting: Accounting, format: str) -> int:
    """Bytes a ``format`` export of ``model`` compressed by a plan with ``accounting`` will take (before it
    is built): its parameters after the plan (dense: the teacher's) at the model's width, plus records."""
    params = count_parameters(model) - (accounting.removed if format == "factorized" else 0)
    return params * next(model.parameters()).element_size() + RECORDS_BYTES
