"""Streaming answer-loss evaluation: token-weighted mean cross-entropy over answer tokens.

loss = Σ per-token CE (nats, summed in float64) / number of answer tokens (answer text + end-of-turn);
perplexity = exp(loss). Examples are consumed lazily in the order given and only running sums are
kept, so memory does not grow with the number of examples.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, stats
from .arch import arch_of
from .data import IGNORE_INDEX, Example, iter_encoded_batches
from .models import input_device
from .progress import Progress, ensure_progress
from .stats import RunningRatio


class EvaluationError(ValueError):
    """Nothing could be scored (no answer token fits), or a score is not a finite number."""


@dataclass
class EvalResult:
    loss: float             # mean answer-token cross-entropy, nats
    perplexity: float       # exp(loss)
    tokens: int             # answer tokens scored
    examples: int           # examples scored
    seconds: float          # wall time (encoding shared by all models + this model's forward passes)
    skipped: int = 0        # examples dropped because no answer token survived max_len
    fingerprint: str = ""   # sha256 (16 hex) over the ordered keys of the scored examples

    def to_dict(self) -> dict:
        return asdict(self)


def default_batch_size(device) -> int:
    """Examples per forward pass: 8 on CUDA; 1 on CPU, where padding is pure cost (measured on ShareGPT
    at max_len 512: CPU time per example 1.3 s at batch 1, 1.9 s at 4, 2.1 s at 8)."""
    return 8 if str(device).startswith("cuda") else 1


def answer_loss_from_hidden(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """(Σ cross-entropy over answer tokens in float64, number of answer tokens) from final hidden states.

    ``hidden`` [B, T, H]: the decoder's last hidden states, after the final norm; ``labels`` [B, T]: the
    batch's labels (``IGNORE_INDEX`` outside answers; token t is predicted from position t-1). The
    model's head and soft-cap (``ArchSpec.logits_of``) run on the answer positions only. Shared by
    :func:`answer_loss_sum` and rank allocation's suffix loss, so both score exactly the same way.
    """
    spec = arch_of(model)
    if not spec.plain_head:
        raise ValueError(f"{spec.model_type}: logits are not head(last hidden state); score through the model")
    targets = labels[:, 1:].to(hidden.device)
    selected = targets != IGNORE_INDEX
    n = int(selected.sum())
    if n == 0:
        return 0.0, 0
    logits = spec.logits_of(model, hidden[:, :-1][selected])
    return _cross_entropy_sum(logits, targets[selected]), n


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Σ per-token cross-entropy (computed in float32, summed in float64)."""
    return float(F.cross_entropy(logits.float(), targets, reduction="none").double().sum())


def logits_at(model: nn.Module, batch: dict, positions: torch.Tensor) -> torch.Tensor:
    """Logits [n, vocab] at ``positions`` [B, T] (bool) of a right-padded batch; positions are counted
    from each row's first real token and padding is masked. For a plain-head architecture (arch table)
    the head runs on those positions only. Shared by scoring and healing."""
    device = input_device(model)  # the embedding's device: a dispatched model (device_map) spans several
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if bool(attention_mask.all()):  # no padding: let the model take its plain causal path
        attention_mask = None
    spec = arch_of(model, strict=False)
    if spec is not None and spec.plain_head:
        hidden = spec.decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask,
                                        position_ids=position_ids, use_cache=False).last_hidden_state
        return spec.logits_of(model, hidden[positions.to(hidden.device)])
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).logits
    return logits[positions.to(logits.device)]


def answer_loss_sum(model: nn.Module, batch: dict) -> tuple[float, int]:
    """(Σ cross-entropy over answer tokens in float64, number of answer tokens) for one padded batch.

    Token t is predicted from position t-1 (``logits_at`` the positions before answer tokens), so right
    padding leaves every row's result unchanged.
    """
    targets, selected, positions = answer_positions(batch)
    n = int(selected.sum())
    if n == 0:
        return 0.0, 0
    logits = logits_at(model, batch, positions)
    return _cross_entropy_sum(logits, targets[selected].to(logits.device)), n


def answer_positions(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(targets [B, T-1], answer-target mask [B, T-1], positions [B, T] predicting those targets)."""
    targets = batch["labels"][:, 1:]
    selected = targets != IGNORE_INDEX
    positions = torch.zeros_like(batch["labels"], dtype=torch.bool)
    positions[:, :-1] = selected
    return targets, selected, positions


def row_sums(values: torch.Tensor, rows: torch.Tensor, batch: int) -> list[float]:
    """Per-row float64 sums of per-token ``values`` [n] at batch rows ``rows`` [n]."""
    return torch.zeros(batch, dtype=torch.float64).index_add_(0, rows, values.double().cpu()).tolist()


def answer_loss_rows(model: nn.Module, batch: dict) -> tuple[list[float], list[int]]:
    """Per row of one padded batch: (Σ cross-entropy over its answer tokens in float64, its answer tokens).

    The same scores as :func:`answer_loss_sum`, kept per example (their sum is its first value)."""
    targets, selected, positions = answer_positions(batch)
    tokens = selected.sum(dim=1).tolist()
    if not sum(tokens):
        return [0.0] * len(tokens), tokens
    logits = logits_at(model, batch, positions)
    ce = F.cross_entropy(logits.float(), targets[selected].to(logits.device), reduction="none")
    return row_sums(ce, positions.nonzero()[:, 0], len(tokens)), tokens


def evaluate_models(models: dict, tokenizer, examples: Iterable[Example], n: Optional[int] = None,
                    batch_size: int = 8, max_len: int = 512, progress: Optional[Progress] = None,
                    world: Optional[tuple[int, int]] = None) -> dict:
    """{name: EvalResult}: every model scored on the same batches in one pass over ``examples``.

    ``n`` caps the number of scored examples (None = all); ``progress(done_examples, total, message)``
    is called after each batch (total = n capped by len(examples) when known; 0 = unknown).

    ``world`` (rank, size), default ``distributed.active_world()``: with size > 1 every rank encodes the
    whole stream into the one-process batches and runs the models on batch b when ``b % size == rank``; the
    per-batch sums are gathered and added in batch order, so every rank returns the one-process results
    (``done`` in progress is then the stream position reached, the message this rank's running loss).
    """
    if not models:
        raise ValueError("evaluate_models needs at least one model")
    if n is not None and int(n) < 1:
        raise ValueError(f"n {n!r} must be >= 1 (or None for every example)")
    rank, size = distributed.active_world() if world is None else world
    progress = ensure_progress(progress)
    total = int(n) if n is not None else 0
    if hasattr(examples, "__len__"):
        total = min(total, len(examples)) if n is not None else len(examples)
    sums = {name: 0.0 for name in models}
    forward_seconds = {name: 0.0 for name in models}
    tokens = done = 0
    local_tokens = 0
    batch_sums: list = []  # (batch index, {name: Σ CE}) of the batches scored here, when size > 1
    stats: dict = {}
    keys = hashlib.sha256()
    start = time.perf_counter()
    with torch.inference_mode():
        for index, (batch, group) in enumerate(iter_encoded_batches(tokenizer, examples, batch_size, max_len,
                                                                    limit=n, stats=stats)):
            done += len(group)
            for example in group:
                keys.update(example.key().encode("ascii") + b"\n")
            if index % size != rank:  # another rank's batch; its answer tokens count here too
                tokens += int(answer_positions(batch)[1].sum())
                continue
            scored = {}
            for name, model in models.items():
                t0 = time.perf_counter()
                loss_sum, batch_tokens = answer_loss_sum(model, batch)
                forward_seconds[name] += time.perf_counter() - t0
                sums[name] += loss_sum
                scored[name] = loss_sum
            tokens += batch_tokens
            local_tokens += batch_tokens
            if size > 1:
                batch_sums.append((index, scored))
            first = next(iter(models))
            loss = sums[first] / max(local_tokens, 1)
            progress(done, total, f"loss {loss:.4f}", stage="evaluate", metrics={"loss": loss})
    skipped = stats.get("skipped", 0)
    shared = (time.perf_counter() - start) - sum(forward_seconds.values())
    seconds = {name: shared + forward_seconds[name] for name in models}
    if size > 1:  # the batches' sums in batch order: the one-process additions, in the one-process order
        parts = distributed.gather((batch_sums, seconds))
        sums = {name: 0.0 for name in models}
        for _, scored in sorted((item for part, _ in parts for item in part), key=lambda item: item[0]):
            for name in models:
                sums[name] += scored[name]
        seconds = {name: max(part_seconds[name] for _, part_seconds in parts) for name in models}
    if tokens == 0:
        raise _nothing_scored(done, skipped, max_len)
    results = {}
    for name in models:
        loss = sums[name] / tokens
        check_finite_loss(loss, name, f"{done} examples")
        results[name] = EvalResult(loss=loss, perplexity=math.exp(loss) if loss < 700 else math.inf,
                                   tokens=tokens, examples=done, seconds=seconds[name],
                                   skipped=skipped, fingerprint=keys.hexdigest()[:16])
    return results


def _nothing_scored(done: int, skipped: int, max_len: int) -> EvaluationError:
    return EvaluationError(f"no answer tokens to score: {done} examples scored, {skipped} skipped because the "
                           f"prompt filled max_len={max_len}; pass more examples or a larger max_len")


def check_finite_loss(loss: float, name: str, scored: str) -> None:
    """``EvaluationError`` when ``loss`` is NaN or infinite: a number no comparison or JSON record can hold."""
    if not math.isfinite(loss):
        raise EvaluationError(f"{name}: the answer loss on {scored} is {loss} (not a finite number): its outputs "
                              "overflow or hold NaN; try --dtype float32 or check the model's weights")


def evaluate(model: nn.Module, tokenizer, examples: Iterable[Example], n: Optional[int] = None,
             batch_size: int = 8, max_len: int = 512, progress: Optional[Progress] = None,
             world: Optional[tuple[int, int]] = None) -> EvalResult:
    """Token-weighted mean answer loss and perplexity of ``model`` on (up to ``n`` of) ``examples``
    (``world``: see :func:`evaluate_models`)."""
    return evaluate_models({"model": model}, tokenizer, examples, n=n, batch_size=batch_size,
                           max_len=max_len, progress=progress, world=world)["model"]


@dataclass
class LossEstimate:
    """The answer loss so far in a streaming pass: the token-weighted mean over the examples scored, with
    its interval (delta-method SE of Σ loss / Σ tokens when examples are resampled; ``stats.ratio_se``)."""

    examples: int           # examples scored so far
    tokens: int             # answer tokens scored so far
    loss: float             # Σ CE / Σ tokens, nats
    se: float               # standard error of ``loss``; inf before two examples
    level: float            # confidence level of ``interval``
    total: int              # examples asked for (0 = unknown)
    seconds: float          # wall time so far
    skipped: int = 0        # examples dropped so far because no answer token survived max_len
    fingerprint: str = ""   # as EvalResult's: the ordered keys of the examples scored so far
    stopped: bool = False   # the pass was ended early (a stop request): a partial estimate

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    @property
    def half_width(self) -> float:
        """Half the width of the ``level`` t interval (N − 1 df; the rule of ``stats.t_half_width``): inf
        below ``stats.MIN_LOSS_INTERVAL_N`` examples, where its coverage fails."""
        return stats.t_half_width(self.se, self.examples, self.level, stats.MIN_LOSS_INTERVAL_N)

    @property
    def interval(self) -> tuple[float, float]:
        return self.loss - self.half_width, self.loss + self.half_width

    def describe(self, what: str = "loss") -> str:
        """'teacher loss 1.6612 ± 0.0521 (95%, 24 examples)'."""
        size = f"{self.examples:,} example{'s' if self.examples != 1 else ''}"
        if not math.isfinite(self.half_width):
            return f"{what} {self.loss:.4f} ({size}; {stats.interval_note(self.examples, stats.MIN_LOSS_INTERVAL_N)})"
        return f"{what} {self.loss:.4f} ± {self.half_width:.4f} ({self.level:.0%}, {size})"

    def result(self) -> EvalResult:
        """The estimate as :func:`evaluate` reports a finished pass."""
        return EvalResult(loss=self.loss, perplexity=self.perplexity, tokens=self.tokens, examples=self.examples,
                          seconds=self.seconds, skipped=self.skipped, fingerprint=self.fingerprint)


def iter_loss_estimates(model: nn.Module, tokenizer, examples: Iterable[Example], n: Optional[int] = None,
                        batch_size: int = 8, max_len: int = 512, level: float = 0.95) -> Iterator[LossEstimate]:
    """A :class:`LossEstimate` after every batch of (up to ``n`` of) ``examples``, scored in the order given
    on the batches :func:`evaluate` uses, so the last estimate is its result (same loss, tokens,
    examples, fingerprint) with an interval. Only five running sums are kept: memory does not grow with
    the number of examples. Stop early by not asking for more (the last estimate is a fair partial one)."""
    if n is not None and int(n) < 1:
        raise ValueError(f"n {n!r} must be >= 1 (or None for every example)")
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level {level!r} must be in (0, 1)")
    total = int(n) if n is not None else 0
    if hasattr(examples, "__len__"):
        total = min(total, len(examples)) if n is not None else len(examples)
    running = RunningRatio()
    done = tokens = 0
    counts: dict = {}
    keys = hashlib.sha256()
    start = time.perf_counter()
    for batch, group in iter_encoded_batches(tokenizer, examples, batch_size, max_len, limit=n, stats=counts):
        with torch.inference_mode():  # per batch: a suspended generator must not leave the caller in it
            losses, counts_ = answer_loss_rows(model, batch)
        for example, loss_sum, k in zip(group, losses, counts_):
            running.add(k, loss_sum)
            keys.update(example.key().encode("ascii") + b"\n")
        done += len(group)
        tokens += sum(counts_)
        loss = running.d / max(tokens, 1)
        check_finite_loss(loss, "model", f"{done} examples")
        yield LossEstimate(examples=done, tokens=tokens, loss=loss, se=running.se(), level=level,
                           total=total, seconds=time.perf_counter() - start, skipped=counts.get("skipped", 0),
                           fingerprint=keys.hexdigest()[:16])
    if tokens == 0:
        raise _nothing_scored(done, counts.get("skipped", 0), max_len)
