"""One comparison — the teacher and its students paired on the same held-out examples — behind ``compare``.

A :class:`CompareSpec` names the teacher, the students (export folders, or plans built from the teacher
by the compression job on the calibration side of the same split), the data and the comparison
settings; :func:`run_compare` builds every student and scores them all with the teacher in one streaming
pass over the evaluation side (:func:`compare.compare_models`). A student already built in memory (the
app's jobs) is scored by :func:`job.evaluate_job` through the same comparison.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import distributed
from .linears import count_parameters
from .compare import CompareSettings, compare_models
from .compress import CompressSettings
from .data import iter_side, make_split
from .generate import side_by_side
from .heal import HealSettings
from .job import DataSpec, JobSpec, ModelSpec, run_job
from .models import LoadedModel, check_device_map, load_model
from .options import OptionError, checked, to_mapping
from .plan import PlanOptions, load_plan
from .progress import Progress
from .threads import runtime_record


@dataclass
class CompareSpec:
    """A whole comparison. ``students``: export folders or plans (file or compact string), each once;
    ``data``: the source and seed of the split (its eval side is streamed) and the calibration examples
    plan students are built from (``data.eval`` is unused: ``compare.examples`` are scored);
    ``plan``, ``method``, ``heal``: applied to every plan student; ``generate``: also greedy and sampled
    answers for that many prompts; ``device_map``: spread the teacher over every GPU."""

    students: list
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=lambda: DataSpec(eval=0))
    compare: CompareSettings = field(default_factory=CompareSettings)
    plan: PlanOptions = field(default_factory=PlanOptions)
    method: CompressSettings = field(default_factory=CompressSettings)
    heal: HealSettings = field(default_factory=HealSettings)
    generate: int = 0
    max_new_tokens: int = 64
    device_map: Optional[str] = None

    def kinds(self) -> dict:
        """{label: "folder" | Plan}, in the order given (``plan`` applied to every plan)."""
        kinds = {}
        for value in self.students:
            if value in kinds or value == "teacher":
                raise OptionError(f"--student {value!r} is given twice or named 'teacher'; each student once")
            path = Path(value).expanduser()
            if path.is_dir():
                if not (path / "config.json").is_file():
                    raise OptionError(f"--student {value!r} is a folder without config.json; pass an export folder "
                                      "or a plan")
                kinds[value] = "folder"
            else:
                kinds[value] = self.plan.apply(load_plan(value))
        return kinds

    def jobs(self) -> dict:
        """{label: JobSpec} of the plan students (compression on the calibration side, no evaluation)."""
        return {label: JobSpec(plan=plan, model=self.model, data=self.data, method=self.method, heal=self.heal,
                               name=f"compare:{label}")
                for label, plan in self.kinds().items() if plan != "folder"}

    def validate(self) -> None:
        """Every check that needs no weights: the comparison settings, every student, the device map and
        every plan student's job."""
        checked("compare", self.compare.validate)
        self.kinds()
        check_device_map(self.device_map, self.model.device, what="--device-map")
        for spec in self.jobs().values():
            spec.validate()


@dataclass
class CompareResult:
    """The teacher, the students (modules), one Comparison per student (``comparisons``), the generated
    answers (rank 0 only), the records of the source that gave no example (``dropped``)."""

    spec: CompareSpec
    teacher: LoadedModel
    students: dict
    comparisons: dict
    generations: dict
    dropped: dict
    processes: int = 1
    runtime: dict = field(default_factory=runtime_record)  # threads, thread policy, versions

    def to_dict(self) -> dict:
        """JSON-ready record (what ``compare --json`` prints): one row per student with the comparison's
        summary beside the parameter counts."""
        spec, teacher = self.spec, self.teacher
        record = {"teacher": teacher.name, "teacher_fingerprint": teacher.fingerprint, "data": spec.data.source,
                  "seed": spec.data.seed, "settings": to_mapping(spec.compare),
                  "students": [{"student": label, "params": count_parameters(self.students[label]),
                                "teacher_params": count_parameters(teacher.model), **self.comparisons[label].summary()}
                               for label in self.students],
                  "generations": self.generations, "dropped": dict(sorted(self.dropped.items())),
                  "threads": self.runtime["threads"], "runtime": self.runtime}
        if spec.device_map is not None:
            record["device_map"] = spec.device_map
        if self.processes > 1:
            record["processes"] = self.processes
        return record


def run_compare(spec: CompareSpec, progress: Optional[Progress] = None,
                world: Optional[tuple[int, int]] = None) -> CompareResult:
    """Run ``spec``: check it, load the teacher, build every student (plan students by :func:`job.run_job`
    on the calibration side of the split), stream the evaluation side through :func:`compare_models`
    (teacher and students on the same batches), generate answers when asked. ``world`` (rank, size),
    default ``distributed.active_world()``: under a launch every rank builds the same students and scores
    its share; rank 0 alone generates."""
    spec.validate()
    rank, size = distributed.active_world() if world is None else world
    m, d = spec.model, spec.data
    if spec.device_map is not None and size > 1:
        raise OptionError(f"--device-map {spec.device_map} spreads one model over every GPU, but this is a launch "
                          f"of {size} processes; use one process with --device-map, or one GPU per process without it")
    kinds, jobs = spec.kinds(), spec.jobs()
    split = make_split(d.source, n_calib=max(job.calib_examples for job in jobs.values()), n_eval=0,
                       seed=d.seed) if jobs else None
    dropped: dict = {}  # records of the source that gave no example, by reason (filled while streaming)
    examples = iter_side(d.source, "eval", seed=d.seed, dropped=dropped)  # streamed: memory stays flat
    device = str(distributed.rank_device(m.device)) if size > 1 else m.device
    teacher = load_model(m.source, dtype=m.dtype, device=device, device_map=spec.device_map)
    students = {}
    for label, kind in kinds.items():
        if kind == "folder":
            students[label] = load_model(label, dtype=m.dtype, device=teacher.device if spec.device_map is None
                                         else "auto", device_map=spec.device_map).model
        else:  # every rank builds the student from the same calibration examples
            students[label] = run_job(jobs[label], progress=progress, loaded=teacher, split=split, evaluate=False,
                                      export=False).student
    comparisons = compare_models(teacher.model, students, teacher.tokenizer, examples, spec.compare, progress=progress,
                                 world=(rank, size))
    generations = {}
    if spec.generate and rank == 0:
        eval_few = list(itertools.islice(iter_side(d.source, "eval", seed=d.seed), spec.generate))
        for label, student in students.items():
            generations[label] = [g.to_dict() for g in side_by_side(
                teacher.model, student, teacher.tokenizer, eval_few, k=spec.generate,
                max_new_tokens=spec.max_new_tokens, seed=spec.compare.seed, progress=progress)]
    return CompareResult(spec, teacher, students, comparisons, generations, dropped, size)
