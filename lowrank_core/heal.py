"""``heal``: end-to-end distillation of a compressed student against its teacher (a stage after any method).

Only the student's own tensors train: the low-rank factors (``down``/``up`` of every ``LowRankLinear``),
optionally their biases and, with ``train_norms``, copies of the norms (the student's norm modules get
their own tensors first — a tensor shared with the teacher never receives a gradient, and the teacher
stays bit-identical). The target is the teacher's next-token distribution at every real token:
``loss = Σ_tokens KL(p_teacher ‖ p_student)`` (``loss="ce"``: the answer tokens' cross-entropy against
the data instead). Teacher logits are computed on the fly, batch by batch — or, with ``teacher_cache``,
read once from the teacher cache (``teacher_cache.py``: top-64 plus the lumped tail) —, and the
head runs on real tokens only, so memory is one batch of logits ``[tokens, vocab]`` per model.

Training pairs come from the calibration side of the honest split (never evaluation data); a seeded
``valid_fraction`` of them is held out for early stopping. Steps accumulate gradients over sequences
until ``batch_tokens`` real tokens; Adam (``train.early_stopped_adam``, the loop refit uses too); the
best-valid factors are restored. With ``checkpoint`` (a
folder) the trainable tensors, Adam's moments and the curve are saved (safetensors + JSON, no pickle)
at every evaluation and a rerun resumes from there.

On CPU, float32 (bf16 autocast trains far slower there: ``docs/benchmarks.md``); on CUDA, bf16 autocast.
A 7B student on one GPU: see ``docs/7b-path.md`` (bf16 weights shared with the teacher, the factors and
their Adam moments, one batch's activations — one layer's with ``checkpointing``).
"""
from __future__ import annotations

import copy
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX, batch_tokens, calibration_batches, split_examples
from .evaluate import logits_at
from .lowrank import low_rank_modules
from .layerwise import model_device
from .options import option, parse_count
from .progress import Progress, ensure_progress
from .teacher_cache import Targets, TeacherCache, batch_targets, check_cache_spec, lumped_kl, resolve_cache
from .train import TrainSettings, TrainState, early_stopped_adam

LOSSES = ("kl", "ce")
AUTOCAST = ("auto", "off", "bf16")


@dataclass
class HealSettings:
    """End-to-end distillation after compression (``tokens=0``: none)."""

    tokens: int = option(0, minimum=0, convert=parse_count,
                         help="healing: training tokens (real tokens the student sees; e.g. 200k, 2M); 0: no healing")
    examples: int = option(0, minimum=0, help="healing: calibration-side examples to train on (0: the job's "
                                              "calibration examples)")
    loss: str = option("kl", choices=LOSSES, help="healing: kl (teacher's next-token distributions, every real "
                                                  "token) or ce (answer tokens' cross-entropy)")
    lr: float = option(1e-4, help="healing: Adam learning rate")
    batch_tokens: int = option(2048, minimum=1, help="healing: real tokens per optimiser step (gradient accumulation)")
    batch_size: Optional[int] = option(None, minimum=1, help="healing: sequences per forward (default: 1 on CPU, "
                                                             "8 on CUDA)")
    max_len: int = option(256, minimum=8, help="healing: tokens per training example")
    valid_fraction: float = option(0.1, help="healing: share of its examples held out for early stopping")
    eval_every: int = option(0, minimum=0, help="healing: steps between validations (0: about 10 in all)")
    patience: int = option(3, minimum=1, help="healing: validations without improvement before stopping")
    train_bias: bool = option(False, help="healing: also train the factorised linears' biases")
    train_norms: bool = option(False, help="healing: also train (copies of) the RMSNorm weights")
    autocast: str = option("auto", choices=AUTOCAST, help="healing: bf16 autocast (auto: on CUDA only)")
    checkpointing: bool = option(False, help="healing: gradient checkpointing of the student's decoder layers "
                                             "(activations of one layer kept for backward: a 7B on one GPU)")
    checkpoint: Optional[str] = option(None, help="healing: folder to save progress to and resume from")
    teacher_cache: str = option("off", help="healing (kl): the teacher's top-64 next-token log-probabilities and "
                                            "tail mass read from / written to a folder, 'auto' (the cache dir's "
                                            "teacher/) or 'off' (teacher run every step)")
    seed: int = option(0, derived=True, help="shuffling and held-out seed (the data seed)")

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown healing loss {self.loss!r}; allowed: {', '.join(LOSSES)}")
        if self.autocast not in AUTOCAST:
            raise ValueError(f"unknown healing autocast {self.autocast!r}; allowed: {', '.join(AUTOCAST)}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"healing valid_fraction {self.valid_fraction!r} must be in [0, 1)")
        if not self.lr > 0:
            raise ValueError(f"healing lr {self.lr!r} must be > 0")
        if int(self.tokens) < 0:
            raise ValueError(f"healing tokens {self.tokens!r} must be >= 0")
        check_cache_spec(self.teacher_cache, "healing teacher_cache")

    @property
    def enabled(self) -> bool:
        return int(self.tokens) > 0


@dataclass
class HealResult:
    """What healing did. Losses are per real token (KL in nats, or CE in nats per answer token)."""

    tokens: int                     # real training tokens seen
    steps: int
    initial_valid: float
    best_valid: float
    best_step: int
    curve: dict                     # train: [per step], valid: [...], eval_steps: [...], eval_tokens: [...]
    trained_parameters: int
    train_examples: int
    valid_examples: int
    seconds: float
    resumed_from: int = 0           # steps already done when a checkpoint was resumed
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- what trains
def trainable_tensors(student: nn.Module, teacher: nn.Module, settings: HealSettings) -> list[nn.Parameter]:
    """The student's own tensors that heal trains (factors, optionally biases and norm copies).

    ``train_norms`` first gives every norm module of the student its own copy of its weight, so the
    teacher's norm tensors are never touched. Raises if any trainable tensor is also the teacher's.
    """
    if settings.train_norms:
        _own_norms(student, teacher)
    params = []
    for module in low_rank_modules(student).values():
        params += [module.down.weight, module.up.weight]
        if settings.train_bias and module.up.bias is not None:
            params.append(module.up.bias)
    if settings.train_norms:
        params += [m.weight for name, m in student.named_modules() if _is_norm(m)]
    shared = {id(t) for t in list(teacher.parameters()) + list(teacher.buffers())}
    if any(id(p) in shared for p in params):
        raise ValueError("a tensor to train is shared with the teacher; healing refuses to modify the teacher")
    if not params:
        raise ValueError("the student has no low-rank factors to heal (compress it first)")
    return params


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower() and isinstance(getattr(module, "weight", None), nn.Parameter)


def _own_norms(student: nn.Module, teacher: nn.Module) -> None:
    teacher_ids = {id(p) for p in teacher.parameters()}
    for name, module in list(student.named_modules()):
        if _is_norm(module) and id(module.weight) in teacher_ids:
            module.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=False)


# ----------------------------------------------------------------------------- the objective
def batch_loss(teacher: nn.Module, student: nn.Module, batch: dict, loss: str,
               targets: Optional[Targets] = None) -> tuple[torch.Tensor, int]:
    """(summed loss over the batch's scored tokens — differentiable w.r.t. the student —, token count).

    ``kl``: every real token's KL(teacher ‖ student) of the next-token distribution — against cached
    teacher ``targets`` (every real token, row-major) when given, the lumped-tail KL
    (``teacher_cache.lumped_kl``, at most the full KL), the teacher not run —; ``ce``: the answer
    tokens' cross-entropy (token t predicted at position t-1)."""
    device = model_device(student)
    mask = batch["attention_mask"].to(device).bool()
    if loss == "ce":
        targets = batch["labels"].to(device)[:, 1:]
        positions = torch.zeros_like(mask)
        positions[:, :-1] = targets != IGNORE_INDEX
        n = int(positions.sum())
        if n == 0:
            return torch.zeros((), device=device), 0
        logits = logits_at(student, batch, positions)
        return F.cross_entropy(logits.float(), targets[positions[:, :-1]], reduction="sum"), n
    if targets is not None:
        s_logp = F.log_softmax(logits_at(student, batch, mask).float(), dim=-1)
        return lumped_kl(targets.to(s_logp.device), s_logp).sum(), int(mask.sum())
    with torch.no_grad():
        t_logp = F.log_softmax(logits_at(teacher, batch, mask).float(), dim=-1)
    s_logp = F.log_softmax(logits_at(student, batch, mask).float(), dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum()
    return kl, int(mask.sum())


def mean_loss(teacher, student, batches: Sequence[dict], loss: str, autocast,
              targets: Optional[Sequence[Targets]] = None) -> float:
    total, tokens = 0.0, 0
    with torch.no_grad(), autocast():
        for i, b in enumerate(batches):
            value, n = batch_loss(teacher, student, b, loss, targets[i] if targets is not None else None)
            total, tokens = total + float(value), tokens + n
    return total / max(1, tokens)


def cached_targets(teacher: nn.Module, batches: Sequence[dict], settings: HealSettings, autocast,
                   cache: Optional[TeacherCache] = None) -> Optional[list[Targets]]:
    """Per batch, the teacher's targets at every real token from the teacher cache (scope ``real``;
    computed and stored on a miss, under ``autocast``), or None when the cache is off or the loss is ``ce``."""
    cache = cache if cache is not None else resolve_cache(settings.teacher_cache)
    if cache is None or settings.loss != "kl":
        return None
    on = autocast is not nullcontext
    namespace = cache.namespace(teacher, "real", settings.max_len, bf16=on, batch_size=settings.batch_size)
    out = []
    try:
        with torch.no_grad(), autocast():
            for b in batches:
                mask = b["attention_mask"].bool()

                def teacher_logp(b=b, mask=mask):
                    return F.log_softmax(logits_at(teacher, b, mask).float(), dim=-1), None

                out.append(batch_targets(namespace, b, mask, teacher_logp)[0])
    finally:
        namespace.flush()
    return out


def _autocast(settings: HealSettings, device: torch.device):
    on = settings.autocast == "bf16" or (settings.autocast == "auto" and device.type == "cuda")
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if on else nullcontext


# ----------------------------------------------------------------------------- checkpoints
def _save_checkpoint(folder: Path, params, best, opt: torch.optim.Adam, state: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
    tensors.update({f"best.{i}": b.detach().cpu().contiguous() for i, b in enumerate(best)})
    for i, p in enumerate(params):
        s = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in s:
                tensors[f"adam.{key}.{i}"] = s[key].detach().cpu().contiguous()
        if "step" in s:
            state.setdefault("adam_steps", {})[str(i)] = float(s["step"])
    tmp = folder / "heal.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(folder / "heal.safetensors")
    (folder / "heal.json").write_text(json.dumps(state))


def _load_checkpoint(folder: Path, params, opt: torch.optim.Adam) -> Optional[tuple[dict, list]]:
    """(state, best tensors) of a checkpoint folder, with ``params`` and Adam's moments restored; None if empty."""
    from safetensors.torch import load_file

    if not (folder / "heal.json").is_file() or not (folder / "heal.safetensors").is_file():
        return None
    state = json.loads((folder / "heal.json").read_text())
    tensors = load_file(str(folder / "heal.safetensors"))
    if state.get("n_params") != len(params):
        raise ValueError(f"healing checkpoint {folder} holds {state.get('n_params')} tensors, this student trains "
                         f"{len(params)}; use another checkpoint folder")
    with torch.no_grad():
        for i, p in enumerate(params):
            saved = tensors[f"param.{i}"]
            if saved.shape != p.shape:
                raise ValueError(f"healing checkpoint {folder} does not match this student (tensor {i}: "
                                 f"{tuple(saved.shape)} vs {tuple(p.shape)})")
            p.copy_(saved)
            if f"adam.exp_avg.{i}" in tensors:
                opt.state[p] = {"step": torch.tensor(state["adam_steps"][str(i)]),
                                "exp_avg": tensors[f"adam.exp_avg.{i}"].to(p.device, p.dtype),
                                "exp_avg_sq": tensors[f"adam.exp_avg_sq.{i}"].to(p.device, p.dtype)}
    return state, [tensors[f"best.{i}"].to(p.device, p.dtype) for i, p in enumerate(params)]


# ----------------------------------------------------------------------------- training
def heal(teacher: nn.Module, student: nn.Module, tokenizer, examples: Sequence, settings: HealSettings,
         progress: Optional[Progress] = None, cache: Optional[TeacherCache] = None) -> HealResult:
    """Distil ``student`` towards ``teacher`` on ``examples`` (calibration side) for ``settings.tokens``
    real tokens; the student's factors are updated in place (best-valid restored). See the module doc.
    With a teacher cache (``cache``, default ``settings.teacher_cache``) and loss ``kl`` the teacher's
    targets are read once from it (computed once on a miss) and the teacher is not run during training."""
    settings.validate()
    progress = ensure_progress(progress)
    start = time.perf_counter()
    device = model_device(student)
    autocast = _autocast(settings, device)
    train_ex, valid_ex = split_examples(list(examples), settings.valid_fraction, settings.seed)
    size = settings.batch_size or (8 if device.type == "cuda" else 1)
    train = calibration_batches(tokenizer, train_ex, size, settings.max_len)
    valid = calibration_batches(tokenizer, valid_ex, size, settings.max_len)
    if not train:
        raise ValueError("healing needs at least one training example")
    params = trainable_tensors(student, teacher, settings)
    opt = torch.optim.Adam(params, lr=settings.lr)
    tokens = [int(b["attention_mask"].sum()) for b in train]
    planned = max(1, math.ceil(int(settings.tokens) / max(1, min(settings.batch_tokens, batch_tokens(train)))))
    eval_every = settings.eval_every or max(1, planned // 10)
    t_train = cached_targets(teacher, train, settings, autocast, cache)
    t_valid = cached_targets(teacher, valid, settings, autocast, cache) if valid else t_train
    score = (lambda: mean_loss(teacher, student, valid or train, settings.loss, autocast, t_valid))
    ckpt = Path(settings.checkpoint) if settings.checkpoint else None
    loaded = _load_checkpoint(ckpt, params, opt) if ckpt else None
    if loaded is None:
        state, best = TrainState.start(score()), [p.detach().clone() for p in params]
    else:
        state, best = TrainState.from_dict(loaded[0]), loaded[1]
    resumed = state.step
    curve = state.curve
    for p in params:
        p.requires_grad_(True)

    def gradient(group):
        """The step's gradient: Σ over its batches of d(summed loss), over the scored tokens."""
        grads = [torch.zeros_like(p) for p in params]
        step_loss, scored = 0.0, 0
        for b in group:
            with autocast():
                value, n = batch_loss(teacher, student, train[b], settings.loss,
                                      t_train[b] if t_train is not None else None)
            if n:
                for g, d in zip(grads, torch.autograd.grad(value, params, allow_unused=True)):
                    if d is not None:
                        g += d
            step_loss, scored = step_loss + float(value.detach()), scored + n
        return [g / max(1, scored) for g in grads], step_loss / max(1, scored)

    def on_eval(state, best):
        if ckpt is not None:
            _save_checkpoint(ckpt, params, best, opt, {"n_params": len(params), **state.to_dict()})

    def on_step(state):
        progress(min(state.seen, int(settings.tokens)), int(settings.tokens),
                 f"heal {settings.loss} {curve['train'][-1]:.4g} valid {curve['valid'][-1]:.4g}",
                 stage="heal", metrics={"train_loss": curve["train"][-1], "valid_loss": curve["valid"][-1]})

    loop = TrainSettings(lr=settings.lr, eval_every=eval_every, patience=settings.patience,
                         batch_tokens=settings.batch_tokens, tokens=int(settings.tokens), seed=settings.seed)
    if settings.checkpointing:  # the student's own module tree: the teacher's modules are not touched
        _checkpointing(student, True)
        student.train()  # transformers checkpoints only in training mode (these models have no dropout)
    try:
        state = early_stopped_adam(params, range(len(train)), tokens, gradient, score, loop, optimizer=opt,
                                   state=state, best=best, on_eval=on_eval, on_step=on_step)
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        if settings.checkpointing:
            _checkpointing(student, False)
            student.eval()
    return HealResult(tokens=state.seen, steps=state.step, initial_valid=state.initial_valid,
                      best_valid=state.best_valid, best_step=state.best_step, curve=curve,
                      trained_parameters=sum(p.numel() for p in params), train_examples=len(train_ex),
                      valid_examples=len(valid_ex), seconds=time.perf_counter() - start, resumed_from=resumed,
                      settings=asdict(settings))


def _checkpointing(model: nn.Module, on: bool) -> None:
    """Activation (gradient) checkpointing on/off, in the spelling this transformers version has."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def copy_student(student: nn.Module) -> nn.Module:
    """A student whose low-rank factors are its own copies (the rest still shared): heal it without
    changing the original student (e.g. to compare before / after)."""
    replacements = {name: copy.deepcopy(m) for name, m in low_rank_modules(student).items()}
    memo: dict = {id(t): t for t in list(student.parameters()) + list(student.buffers())}
    for name, module in replacements.items():
        memo[id(student.get_submodule(name))] = module
    return copy.deepcopy(student, memo)
