"""One rank-allocation search — goal, split, model, validation examples, ``allocate``, the paired score —
behind the ``search`` command and the Search page.

A :class:`SearchSpec` says everything a search needs; :func:`run_search` checks it (the goal too, on the
model's config, before any example is read or weight loaded), makes the honest split (calibration side,
its validation share, evaluation side), loads the teacher, takes the validation examples that fit,
allocates, then scores the found student against the teacher on the evaluation examples through the
paired comparison (:func:`job.paired_evaluation`, as every job is scored). The app passes the model and
split it keeps cached.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Optional

from .allocate import VAL_OVERDRAW, Allocation, SearchSettings, allocate, fitting_examples, search_goal
from .linears import meta_model
from .compare import Comparison
from .data import Split, make_split
from .job import DataSpec, EvalSpec, ModelSpec, paired_evaluation
from .models import LoadedModel, load_config, load_model, refuse_factorized, resolve_device
from .options import OptionError, checked, to_mapping
from .progress import Progress, ensure_progress
from .threads import runtime_record

DEFAULT_VAL = 32  # validation examples of a search (the job's DataSpec holds none by default)


@dataclass
class SearchSpec:
    """A whole search. The goal is at most one of ``budget`` (nats or ``"N%"`` of the teacher's validation
    loss), ``keep_params`` (fraction of the eligible decoder linears' parameters) or ``target_params``
    (total parameters after); none = a budget of 1 %. ``search.compression``'s ``calib`` and ``seed``
    (and ``search.heal``'s seed) come from ``data``. The evaluation's max_len defaults to the
    calibration max_len."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=lambda: DataSpec(val=DEFAULT_VAL))
    search: SearchSettings = field(default_factory=SearchSettings)
    budget: Optional[str] = None
    keep_params: Optional[float] = None
    target_params: Optional[int] = None
    evaluate: EvalSpec = field(default_factory=EvalSpec)
    name: Optional[str] = None

    def __post_init__(self):
        d, s = self.data, self.search
        self.search = dataclasses.replace(s, compression=dataclasses.replace(s.compression, calib=d.calib, seed=d.seed),
                                          heal=dataclasses.replace(s.heal, seed=d.seed))

    @property
    def eval_examples(self) -> int:
        return self.evaluate.examples or self.data.eval

    @property
    def calib_examples(self) -> int:
        """Calibration-side examples the split must hold: for the Grams and for healing in the loop."""
        heal = self.search.heal
        return max(self.data.calib, heal.examples if heal.enabled else 0)

    @property
    def eval_max_len(self) -> int:
        return self.evaluate.max_len or self.search.compression.max_len

    def goal(self, model) -> tuple:
        """``(budget, target_params)`` for ``allocate`` on ``model`` (a meta model from the config will do);
        a malformed goal raises ``BudgetError``."""
        return search_goal(model, budget=self.budget, keep_params=self.keep_params, target_params=self.target_params,
                           modules=self.search.modules)

    def validate(self, model=None) -> tuple:
        """Every check that needs no weights: sizes, settings, device, a teacher that is not factorized, the
        goal (on ``model``, default the config's meta model). Returns :meth:`goal`'s pair."""
        d = self.data
        if d.val < 1 or d.eval < 1:
            raise OptionError(f"--val {d.val} and --eval {d.eval} must be at least 1: the search is verified on "
                              "validation examples and its plan scored on evaluation examples")
        if self.evaluate.examples is not None and self.evaluate.examples > d.eval:
            raise OptionError(f"evaluate.examples: {self.evaluate.examples} is more than the split's data.eval = "
                              f"{d.eval} examples")
        checked("search", self.search.validate)
        checked("evaluate", self.evaluate.compare_settings(1, 1, 8).validate)
        resolve_device(self.model.device, "model.device")
        refuse_factorized(self.model.source)
        return self.goal(model if model is not None else meta_model(load_config(self.model.source)))

    def to_dict(self) -> dict:
        """JSON-ready form of the spec (what a search's record carries as ``job``)."""
        s = self.search
        search = {f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.name not in ("compression", "heal")}
        search = {k: list(v) if isinstance(v, tuple) else v for k, v in search.items()}
        search.update(compression=to_mapping(s.compression), heal=to_mapping(s.heal))
        return {"name": self.name, "model": to_mapping(self.model), "data": to_mapping(self.data), "search": search,
                "goal": {"budget": self.budget, "keep_params": self.keep_params, "target_params": self.target_params},
                "evaluate": to_mapping(self.evaluate)}


@dataclass
class SearchResult:
    """What a search produced: the allocation (plan, Pareto rows, found student) and the paired comparison
    of the found student with the teacher on the evaluation examples."""

    spec: SearchSpec
    loaded: LoadedModel
    split: Split
    allocation: Allocation
    comparison: Comparison
    budget: Optional[str]  # the goal's budget as asked (None for a parameter target)
    seconds: float = 0.0
    runtime: dict = field(default_factory=runtime_record)  # threads, thread policy, versions

    @property
    def student(self):
        return self.allocation.student

    @property
    def evaluation(self) -> dict:
        """{"teacher", "student"} EvalResults of the comparison."""
        return {side: self.comparison.eval_result(side) for side in ("teacher", "student")}

    def to_dict(self) -> dict:
        """JSON-ready record (what ``search --json`` prints): the allocation, the teacher's validation loss,
        the evaluation losses and Δ, the paired comparison's summary, the split and the spec."""
        a, ev = self.allocation, self.evaluation
        t, s = ev["teacher"], ev["student"]
        return {"model": self.loaded.name, "data": self.spec.data.source, "budget_arg": self.budget, **a.to_dict(),
                "teacher_val_loss": a.teacher_loss, "teacher_loss": t.loss, "eval_loss": s.loss,
                "eval_delta": s.loss - t.loss, "eval_examples": s.examples, "eval_tokens": s.tokens,
                "comparison": self.comparison.summary(), "split": self.split.info.to_dict(), "job": self.spec.to_dict(),
                "seconds": self.seconds, "threads": self.runtime["threads"], "runtime": self.runtime}


def validation_examples(spec: SearchSpec, tokenizer, split: Split) -> list:
    """The first ``data.val`` validation-side examples of ``split`` that fit ``search.val_max_len`` tokens."""
    val = fitting_examples(tokenizer, split.val, spec.data.val, spec.search.val_max_len)
    if not val:
        raise OptionError(f"no validation example fits val_max_len = {spec.search.val_max_len} tokens; raise it")
    return val


def search_split(spec: SearchSpec) -> Split:
    """The split a search reads: its calibration examples, ``VAL_OVERDRAW`` times the validation examples
    asked (long prompts do not fit ``val_max_len``) and its evaluation examples."""
    d = spec.data
    return make_split(d.source, n_calib=spec.calib_examples, n_eval=d.eval, n_val=VAL_OVERDRAW * d.val, seed=d.seed)


def run_search(spec: SearchSpec, progress: Optional[Progress] = None, loaded: Optional[LoadedModel] = None,
               split: Optional[Split] = None) -> SearchResult:
    """Run ``spec``: check it (the goal before any work), split (unless ``split``: its first calibration
    and evaluation examples are used, and its validation side must hold enough that fit), load (unless
    ``loaded``), allocate, then the paired comparison of the found student with the teacher on the first
    ``spec.eval_examples`` evaluation examples."""
    start = time.perf_counter()
    spec.validate(loaded.model if loaded is not None else None)
    progress = ensure_progress(progress)
    split = split if split is not None else search_split(spec)
    if loaded is None:
        m = spec.model
        loaded = load_model(m.source, dtype=m.dtype, device=m.device)
    val = validation_examples(spec, loaded.tokenizer, split)
    budget, target = spec.goal(loaded.model)
    allocation = allocate(loaded.model, loaded.tokenizer, split.calib[: spec.calib_examples], val, budget=budget,
                          target_params=target, settings=spec.search, progress=progress)
    comparison = paired_evaluation(loaded, allocation.student, split.eval, spec.evaluate, spec.eval_examples,
                                   spec.eval_max_len, progress=progress)
    comparison.summary()  # its bootstrap here, in the job; nothing scored (every prompt too long): a ValueError
    return SearchResult(spec, loaded, split, allocation, comparison, budget, time.perf_counter() - start)
