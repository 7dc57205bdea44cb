"""Paired teacher/student comparison on held-out examples: one streaming pass, per-example sums, a verdict.

Teacher and every student see the same batches. For each example only scalars are kept (answer tokens,
Σ CE of the teacher and of the student, Σ KL(teacher ‖ student), top-1 agreements), never per-token
tensors, so memory grows by a few floats per example whatever N; the worst examples are kept in a heap
of fixed size. :func:`compare_models` returns one :class:`Comparison` per student; its
:meth:`~Comparison.summary` (the ``compare --json`` report, the manifest's ``comparison``, the model
card's evaluation) carries Δloss with its t interval (shown from ``stats.MIN_INTERVAL_N`` examples), the
t-test, the TOST verdict at a margin — or, with ``until_decided``, the group-sequential TOST's decision and
the N it stopped at —, KL, top-1 agreement and both perplexities (``stats.py`` holds the statistics).

With a teacher cache (``CompareSettings.teacher_cache``, default ``auto``: ``teacher_cache.py``) the
teacher's per-example results are read from disk and only the students run; Σ CE and top-1 are exact,
KL is the lumped-tail KL against the teacher's top-64 (a lower bound of the full KL). When the teacher
runs, the leading decoder layers a student shares unchanged with it run once for both.

A progress callback that raises :class:`~lowrank_core.progress.Cancelled` (a job's stop request) ends
the pass early: the examples scored so far are kept and the comparison is marked ``stopped``.

Under a launch of N processes (``distributed.py``) each rank scores every N-th batch of the same batches
and the per-example scalars are gathered in stream order: N processes give the one-process Comparison.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import heapq
import math
import time
from array import array
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, stats
from .data import Example, iter_encoded_batches
from .evaluate import EvalResult, answer_positions, default_batch_size, logits_at, row_sums
from .layerwise import decoder_inputs, decoder_layers, head_logits, model_device, run_layers, shared_layers
from .options import option
from .progress import Cancelled, Progress, ensure_progress
from .teacher_cache import Namespace, TeacherCache, batch_targets, check_cache_spec, lumped_kl, resolve_cache

EXCERPT_CHARS = 240


@dataclass
class CompareSettings:
    """How a comparison is run and judged."""

    examples: int = option(200, minimum=1, flag="--n", help="evaluation examples scored (eval side of the split)")
    margin: str = option("1%", help="equivalence margin: nats (0.02) or percent of the teacher loss ('1%')")
    level: float = option(0.95, help="confidence level of the reported interval")
    alpha: float = option(0.05, help="level of each one-sided test of the equivalence verdict")
    bootstrap: int = option(2000, minimum=1, help="kept for old recipes and flags: the interval is now the t "
                                                  "interval (stats.py), no bootstrap is drawn")
    until_decided: bool = option(False, help="stop at the first planned look where the group-sequential TOST "
                                             "decides; --n is then the maximum N (the app's default)")
    looks: int = option(stats.DEFAULT_LOOKS, minimum=1, help="planned looks of --until-decided, equally spaced "
                                                             f"up to --n, none before N = {stats.MIN_INTERVAL_N}")
    worst: int = option(10, minimum=0, help="examples where the student loses most, kept for the report")
    batch_size: Optional[int] = option(None, minimum=1, flag="--eval-batch-size", help="examples per forward pass (default: 1 on CPU, 8 on "
                                                             "CUDA; batches are length-bucketed)")
    max_len: int = option(512, minimum=8, flag="--eval-max-len", help="tokens per evaluation example (prompt + answer)")
    bf16: bool = option(False, help="bfloat16 autocast for the forward passes (CUDA; losses stay float32)")
    teacher_cache: str = option("auto", help="teacher results reused across comparisons: a folder, 'auto' (the "
                                             "cache dir's teacher/) or 'off'; KL is then against the teacher's "
                                             "top-64 with the tail lumped (a lower bound of the full KL)")
    seed: int = option(0, minimum=0, flag="--bootstrap-seed", help="bootstrap seed")

    def validate(self, teacher_loss: float = 1.0) -> None:
        """Every check that needs no model: levels, margin syntax."""
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"level {self.level!r} must be in (0, 1)")
        if not 0.0 < self.alpha < 0.5:
            raise ValueError(f"alpha {self.alpha!r} must be in (0, 0.5)")
        stats.parse_margin(self.margin, teacher_loss)
        check_cache_spec(self.teacher_cache, "teacher_cache")
        if int(self.looks) < 1:
            raise ValueError(f"looks {self.looks!r} must be >= 1")


@dataclass
class Comparison:
    """One student against the teacher on the same examples: per-example scalars (scoring order) and the
    worst examples. Losses in nats; ``diff`` = student − teacher Σ CE per example."""

    settings: CompareSettings
    keys: list = field(default_factory=list)
    tokens: array = field(default_factory=lambda: array("q"))
    teacher: array = field(default_factory=lambda: array("d"))
    student: array = field(default_factory=lambda: array("d"))
    kl: array = field(default_factory=lambda: array("d"))
    agree: array = field(default_factory=lambda: array("q"))
    worst_heap: list = field(default_factory=list)  # (diff, order, key, prompt excerpt, tokens)
    skipped: int = 0
    stopped: bool = False
    seconds: float = 0.0
    planned: int = 0  # the maximum N of an until-decided pass (examples asked for, or the stream's length)
    _summary: Optional[dict] = field(default=None, repr=False)  # computed once (the sequential replay is O(N))

    @property
    def examples(self) -> int:
        return len(self.tokens)

    @property
    def diff(self) -> list:
        return [s - t for s, t in zip(self.student, self.teacher)]

    def loss(self, which: str) -> float:
        values = self.teacher if which == "teacher" else self.student
        return math.fsum(values) / max(1, sum(self.tokens))

    def fingerprint(self) -> str:
        """sha256 (16 hex) over the sorted keys of the scored examples (order-free: batches are bucketed)."""
        h = hashlib.sha256()
        for key in sorted(self.keys):
            h.update(key.encode("ascii") + b"\n")
        return h.hexdigest()[:16]

    def eval_result(self, which: str) -> EvalResult:
        """The token-weighted mean of one side, as :func:`evaluate.evaluate_models` reports it."""
        loss = self.loss(which)
        return EvalResult(loss=loss, perplexity=_perplexity(loss), tokens=int(sum(self.tokens)),
                          examples=self.examples, seconds=self.seconds, skipped=self.skipped,
                          fingerprint=self.fingerprint())

    def judged(self, margin: str) -> "Comparison":
        """The same scores judged at another equivalence ``margin`` (nothing is rescored)."""
        stats.parse_margin(margin, self.loss("teacher"))
        return dataclasses.replace(self, settings=dataclasses.replace(self.settings, margin=str(margin)),
                                   _summary=None)

    def test(self) -> stats.PairedTest:
        s = self.settings
        margin = stats.parse_margin(s.margin, self.loss("teacher"))
        return stats.paired_test(self.tokens, self.diff, margin, level=s.level, alpha=s.alpha, reps=s.bootstrap,
                                 seed=s.seed)

    def sequential(self) -> Optional[stats.SequentialTest]:
        """The group-sequential TOST over the rows in scoring order (``until_decided`` only; None otherwise):
        the decision the pass stopped on, or undecided at the maximum ``settings.examples``."""
        s = self.settings
        if not s.until_decided:
            return None
        return stats.sequential_test(self.tokens, self.diff, s.margin, max_n=self.planned or s.examples,
                                     alpha=s.alpha, looks=s.looks, teacher=self.teacher)

    def truncated(self, examples: int) -> None:
        """Keep the first ``examples`` rows (a sequential stop drops the rest of the last batch)."""
        if examples >= self.examples:
            return
        for name in ("tokens", "teacher", "student", "kl", "agree"):
            setattr(self, name, getattr(self, name)[:examples])
        self.keys = self.keys[:examples]
        self.worst_heap = [item for item in self.worst_heap if item[1] < examples]
        heapq.heapify(self.worst_heap)
        self._summary = None

    def worst(self) -> list[dict]:
        rows = sorted(self.worst_heap, reverse=True)
        return [{"key": key, "prompt": prompt, "delta": d, "delta_per_token": d / max(1, n), "tokens": n}
                for d, _, key, prompt, n in rows]

    def summary(self) -> dict:
        """The report: sizes, both losses and perplexities, Δ with interval, tests, verdict, KL, top-1."""
        if self._summary is None:
            self._summary = self._report()
        return self._summary

    def _report(self) -> dict:
        if not self.examples or sum(self.tokens) == 0:
            raise ValueError(f"no answer tokens were scored ({self.skipped} examples skipped because the prompt "
                             f"filled max_len={self.settings.max_len}); nothing to compare")
        t_loss, s_loss, test = self.loss("teacher"), self.loss("student"), self.test()
        n_tokens = int(sum(self.tokens))
        seq = self.sequential()
        if seq is not None:
            verdict, decided, stopping_n, procedure = seq.verdict, seq.decided, seq.stopping_n, seq.procedure
        else:
            verdict, decided, stopping_n = test.verdict, test.verdict != "inconclusive", self.examples
            procedure = f"fixed-N TOST, {stats.INTERVAL_METHOD}"
        return {"examples": self.examples, "tokens": n_tokens, "skipped": self.skipped, "stopped": self.stopped,
                "fingerprint": self.fingerprint(), "teacher_loss": t_loss, "student_loss": s_loss,
                "teacher_perplexity": _perplexity(t_loss), "student_perplexity": _perplexity(s_loss),
                "delta": test.delta, "delta_se": test.se, "delta_ci": _listed(test.ci), "ci_level": test.level,
                "interval_method": stats.INTERVAL_METHOD, "interval_note": test.interval_note,
                "min_interval_n": stats.MIN_INTERVAL_N,
                "p_value": test.p_value, "margin": test.margin, "margin_arg": str(self.settings.margin),
                "alpha": test.alpha, "tost_ci": _listed(test.tost_ci), "tost_p": test.tost_p,
                "verdict": verdict, "verdict_text": stats.verdict_sentence(test, t_loss, seq),
                "decided": decided, "stopping_n": stopping_n, "procedure": procedure,
                "sequential": seq.to_dict() if seq is not None else None,
                "more_examples": test.more_examples if seq is None else None, "kl": math.fsum(self.kl) / n_tokens,
                "top1_agreement": sum(self.agree) / n_tokens, "bootstrap": self.settings.bootstrap,
                "worst": self.worst(), "seconds": self.seconds}

    def rows(self) -> list[dict]:
        """Per-example rows (scoring order): key, tokens, teacher/student Σ CE and mean CE, Δ, KL, top-1."""
        out = []
        for i, key in enumerate(self.keys):
            n = self.tokens[i]
            out.append({"key": key, "tokens": n, "teacher_sum": self.teacher[i], "student_sum": self.student[i],
                        "teacher_loss": self.teacher[i] / n, "student_loss": self.student[i] / n,
                        "delta": (self.student[i] - self.teacher[i]) / n, "kl": self.kl[i] / n,
                        "top1_agreement": self.agree[i] / n})
        return out

    def interval_path(self, points: int = 12) -> list[dict]:
        s = self.settings
        return stats.interval_path(self.tokens, self.diff, level=s.level, reps=min(500, s.bootstrap), seed=s.seed,
                                   points=points)


def _listed(interval) -> Optional[list]:
    return list(interval) if interval is not None else None


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def _autocast(model: nn.Module, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    device = model_device(model)
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def _excerpt(example: Example) -> str:
    text = " ".join(example.user.split())
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 1] + "…"


class _Forward:
    """Logits at ``positions`` of the teacher and of each student for one batch. Students in ``forks``
    ({name: L >= 1}) share the teacher's first L decoder layers unchanged: when the teacher runs, those
    layers run once (its states at each L kept) and each such student runs only its own layers from there."""

    def __init__(self, teacher: nn.Module, students: dict, batch: dict, positions: torch.Tensor, forks: dict,
                 bf16: bool):
        self.teacher_model, self.students, self.batch, self.positions = teacher, students, batch, positions
        self.forks, self.bf16 = forks, bf16
        self.inputs, self.states = None, {}

    def teacher(self) -> torch.Tensor:
        with _autocast(self.teacher_model, self.bf16):
            if not self.forks:
                return logits_at(self.teacher_model, self.batch, self.positions)
            self.inputs = decoder_inputs(self.teacher_model, self.batch)
            hidden, done = self.inputs.hidden[0], 0
            for stop in sorted(set(self.forks.values())):
                hidden, done = run_layers(self.teacher_model, self.inputs, hidden, done, stop), stop
                self.states[stop] = hidden
            depth = len(decoder_layers(self.teacher_model))
            return head_logits(self.teacher_model, run_layers(self.teacher_model, self.inputs, hidden, done, depth),
                               self.positions)

    def student(self, name: str) -> torch.Tensor:
        model = self.students[name]
        with _autocast(model, self.bf16):
            start = self.forks.get(name)
            if start is None or start not in self.states:   # not shared, or the teacher did not run
                return logits_at(model, self.batch, self.positions)
            depth = len(decoder_layers(model))
            return head_logits(model, run_layers(model, self.inputs, self.states[start], start, depth), self.positions)


def shared_forks(teacher: nn.Module, students: dict) -> dict:
    """{student name: leading decoder layers it shares unchanged with the teacher}, for those sharing >= 1."""
    out = {}
    for name, student in students.items():
        count = shared_layers(teacher, student)
        if count:
            out[name] = count
    return out


def score_batch(teacher: nn.Module, students: dict, batch: dict, bf16: bool = False,
                cache: Optional[Namespace] = None, forks: Optional[dict] = None) -> dict:
    """Per-row scalars of one padded batch: {"tokens": [B], "teacher": [B] Σ CE, name: {"ce", "kl", "agree"}}.

    Positions are those predicting answer tokens (token t from position t-1); KL(teacher ‖ student) is
    summed over the vocabulary per token (float32) and over tokens per row (float64). With a teacher
    ``cache`` namespace (scope ``answer``) the teacher runs only for rows not cached, and KL is the
    lumped-tail KL against the cached top-k (``teacher_cache.lumped_kl``: at most the full KL, short of it
    by at most ``kl_gap_bound``); Σ CE and top-1 are exact either way. ``forks``: :func:`shared_forks`."""
    targets, selected, positions = answer_positions(batch)
    rows = positions.nonzero()[:, 0]
    size = batch["labels"].shape[0]
    out = {"tokens": selected.sum(dim=1).tolist()}
    if not bool(selected.any()):
        out["teacher"] = [0.0] * size
        for name in students:
            out[name] = {"ce": [0.0] * size, "kl": [0.0] * size, "agree": [0] * size}
        return out
    forward = _Forward(teacher, students, batch, positions, forks or {}, bf16)
    goal = targets[selected]

    def teacher_logp():
        t_logp = F.log_softmax(forward.teacher().float(), dim=-1)
        return t_logp, row_sums(-t_logp.gather(1, goal[:, None].to(t_logp.device))[:, 0], rows, size)

    if cache is None:
        t_logp, out["teacher"] = teacher_logp()
        t_top, t_p = t_logp.argmax(dim=-1), t_logp.exp()

        def kl_of(s_logp):
            return (t_p * (t_logp - s_logp.to(t_logp.device))).sum(dim=-1)
    else:
        cached, per_row = batch_targets(cache, batch, positions, teacher_logp)
        out["teacher"], t_top = [r.ce for r in per_row], cached.top1

        def kl_of(s_logp):
            return lumped_kl(cached.to(s_logp.device), s_logp)
    for name in students:
        s_logp = F.log_softmax(forward.student(name).float(), dim=-1)
        kl = kl_of(s_logp)
        out[name] = {"ce": row_sums(-s_logp.gather(1, goal[:, None].to(s_logp.device))[:, 0], rows, size),
                     "kl": row_sums(kl, rows, size),
                     "agree": [int(v) for v in row_sums((s_logp.argmax(dim=-1) == t_top.to(s_logp.device)).double(),
                                                        rows, size)]}
        del s_logp, kl
    return out


def compare_models(teacher: nn.Module, students: dict, tokenizer, examples: Iterable[Example],
                   settings: Optional[CompareSettings] = None, progress: Optional[Progress] = None,
                   world: Optional[tuple[int, int]] = None, cache: Optional[TeacherCache] = None) -> dict:
    """{student name: Comparison}: teacher and every student scored on the same batches of (up to
    ``settings.examples`` of) ``examples``, consumed lazily. ``progress(done, total, message)`` after each
    batch (stage ``compare``), its metrics the first student's running Δ (``delta``, nats per answer token)
    and the 95% half-width (``half_width``), which the message also shows.

    ``world`` (rank, size), default ``distributed.active_world()``: with size > 1 every rank encodes the
    whole stream into the batches one process builds, scores batch b when ``b % size == rank``, and the
    per-example scalars are gathered and put back in stream order, so every rank returns the one-process
    Comparison (same rows, Δ, interval, tests, worst list). ``done`` is then the stream position reached and
    the running Δ is this rank's; a ``Cancelled`` stops only the rank that raised it (the others finish
    their shards) and the gathered comparison is marked ``stopped``.

    ``cache`` (default: ``settings.teacher_cache`` resolved): the teacher's per-example results are read
    from it and only missing examples run the teacher (:func:`score_batch`); new ones are written to it,
    also when stopped. Leading decoder layers a student shares unchanged with the teacher run once for both
    whenever the teacher runs (:func:`shared_forks`)."""
    settings = settings or CompareSettings()
    settings.validate()
    if not students:
        raise ValueError("compare needs at least one student")
    if "teacher" in students:
        raise ValueError("'teacher' cannot name a student")
    rank, size = distributed.active_world() if world is None else world
    progress = ensure_progress(progress)
    n = int(settings.examples)
    total = min(n, len(examples)) if hasattr(examples, "__len__") else n
    batch_size = settings.batch_size or default_batch_size(model_device(teacher))
    results = {name: Comparison(settings, planned=total or n) for name in students}
    first = next(iter(students))
    running = stats.RunningRatio()  # the first student's Δ, for the progress message
    # until decided: one group-sequential monitor per student; the pass ends when every one has decided
    # (one process only: a launch scores the maximum and the decision is read from the rows afterwards)
    monitors = ({name: stats.SequentialMonitor(settings.margin, total or n, settings.alpha, settings.looks)
                 for name in students}
                if settings.until_decided and size == 1 else {})
    counts = {"skipped": 0}
    orders: list = []  # stream position of each example scored here (a world > 1 puts them back in order)
    start = time.perf_counter()
    order = 0
    cache = cache if cache is not None else resolve_cache(settings.teacher_cache)
    namespace = cache.namespace(teacher, "answer", settings.max_len, settings.bf16,
                                settings.batch_size) if cache is not None else None
    forks = shared_forks(teacher, students)
    with torch.inference_mode():
        try:
            for index, (batch, group) in enumerate(iter_encoded_batches(
                    tokenizer, examples, batch_size, settings.max_len, limit=n, stats=counts,
                    sort_window=8 if batch_size > 1 else 1)):
                if index % size != rank:  # another rank's batch: same composition, scored there
                    order += len(group)
                    continue
                scored = score_batch(teacher, students, batch, settings.bf16, cache=namespace, forks=forks)
                for row, example in enumerate(group):
                    k = scored["tokens"][row]
                    for name, result in results.items():
                        _add(result, example, order, k, scored["teacher"][row], scored[name], row)
                    running.add(k, scored[first]["ce"][row] - scored["teacher"][row])
                    for name, monitor in monitors.items():
                        monitor.add(k, scored[name]["ce"][row] - scored["teacher"][row], scored["teacher"][row])
                    if size > 1:
                        orders.append(order)
                    order += 1
                monitor = monitors.get(first)
                progress(order, total, _running_message(running, settings.level, monitor), stage="compare",
                         metrics=_running_metrics(running, settings.level, monitor))
                if monitors and all(m.decided for m in monitors.values()):
                    break  # decided: a normal end, not a stop
        except Cancelled:
            for result in results.values():
                result.stopped = True
        finally:
            if namespace is not None:
                namespace.flush()
    elapsed = time.perf_counter() - start
    for result in results.values():
        result.skipped, result.seconds = counts["skipped"], elapsed
    if size > 1:
        results = _gathered(results, orders, settings)
    if settings.until_decided:
        _keep_until_decided(results)
    return results


def _keep_until_decided(results: dict) -> None:
    """Once every student is decided, keep the rows up to the last deciding look (the rest of its batch,
    or under a launch the rest of the maximum, was scored but is not part of the sequential result)."""
    tests = [r.sequential() for r in results.values() if r.examples and sum(r.tokens)]
    if tests and all(t.decided for t in tests):
        cut = max(t.stopping_n for t in tests)
        for result in results.values():
            result.truncated(cut)


def _gathered(results: dict, orders: list, settings: CompareSettings) -> dict:
    """Every rank's Comparisons merged (on every rank) into the one-process ones: per-example scalars in
    stream order, the worst list the largest of all ranks' worst lists, skipped and seconds the largest of
    the ranks' (each rank counts the skips of the whole stream), stopped when any rank stopped."""
    parts = distributed.gather({"orders": orders, "results": {
        name: (r.keys, r.tokens, r.teacher, r.student, r.kl, r.agree, r.worst_heap, r.skipped, r.stopped, r.seconds)
        for name, r in results.items()}})
    positions = [o for part in parts for o in part["orders"]]
    perm = sorted(range(len(positions)), key=positions.__getitem__)
    merged = {}
    for name in results:
        fields = list(zip(*(part["results"][name] for part in parts)))
        keys, tokens, teacher, student, kl, agree, heaps = ([v for values in column for v in values]
                                                           for column in fields[:7])
        worst = heapq.nlargest(settings.worst, heaps)
        heapq.heapify(worst)
        merged[name] = Comparison(settings, keys=[keys[i] for i in perm],
                                  tokens=array("q", (tokens[i] for i in perm)),
                                  teacher=array("d", (teacher[i] for i in perm)),
                                  student=array("d", (student[i] for i in perm)),
                                  kl=array("d", (kl[i] for i in perm)), agree=array("q", (agree[i] for i in perm)),
                                  worst_heap=worst, skipped=max(fields[7]), stopped=any(fields[8]),
                                  seconds=max(fields[9]), planned=results[name].planned)
    return merged


def _add(result: Comparison, example: Example, order: int, tokens: int, teacher_ce: float, scored: dict,
         row: int) -> None:
    """Append one example's scalars (encoding drops examples without answer tokens, so ``tokens`` >= 1)."""
    result.keys.append(example.key())
    result.tokens.append(tokens)
    result.teacher.append(teacher_ce)
    result.student.append(scored["ce"][row])
    result.kl.append(scored["kl"][row])
    result.agree.append(scored["agree"][row])
    item = (scored["ce"][row] - teacher_ce, order, example.key(), _excerpt(example), tokens)
    if result.settings.worst:
        if len(result.worst_heap) < result.settings.worst:
            heapq.heappush(result.worst_heap, item)
        elif item > result.worst_heap[0]:
            heapq.heapreplace(result.worst_heap, item)


def _running_metrics(running: stats.RunningRatio, level: float = 0.95,
                     monitor: Optional[stats.SequentialMonitor] = None) -> dict:
    """The live figures, by the rule of the summary: Δ so far; its ``level`` t half-width (inf below
    ``stats.MIN_INTERVAL_N``); with a monitor, the boundary the estimate has to cross at the next look
    (``equivalent_within``: |Δ| below it decides equivalent; ``not_equivalent_beyond``: |Δ| above it, not)."""
    if running.n <= 0:
        return {}
    metrics = {"delta": running.ratio, "half_width": stats.t_half_width(running.se(), running.count, level)}
    boundary = monitor.boundary() if monitor is not None else None
    if boundary is not None:
        metrics.update(boundary)
    return metrics


def _running_message(running: stats.RunningRatio, level: float = 0.95,
                     monitor: Optional[stats.SequentialMonitor] = None) -> str:
    if running.n <= 0:
        return "no answer tokens yet"
    half = stats.t_half_width(running.se(), running.count, level)
    text = f"Δloss {running.ratio:+.4f}" + (f" ± {half:.4f}" if math.isfinite(half) else "") + " nats/token"
    if not math.isfinite(half):
        text += f" ({stats.interval_note(running.count)})"
    if monitor is not None and monitor.decided:
        text += f"; {monitor.result().describe()}: {monitor.verdict}"
    return text


def compare(teacher: nn.Module, student: nn.Module, tokenizer, examples: Iterable[Example],
            settings: Optional[CompareSettings] = None, progress: Optional[Progress] = None,
            world: Optional[tuple[int, int]] = None) -> Comparison:
    """One student against the teacher (see :func:`compare_models`)."""
    return compare_models(teacher, {"student": student}, tokenizer, examples, settings, progress, world)["student"]
