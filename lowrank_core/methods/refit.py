"""``refit``: whitened factors, then an Adam refit of each decoder layer on the student's stream.

On the teacher's own inputs the ``whitened`` factors already minimise each matrix's output error, so a
refit of that objective cannot beat them. What no closed form solves, and what this module optimises:

- ``target="block"`` (default): the whole student decoder layer (attention + MLP, through the
  nonlinearities), applied to the STUDENT's inputs (what the already-compressed earlier layers produce),
  must reproduce the TEACHER layer's output on the teacher's inputs. Loss: mean squared error per
  element over real (non-padding) tokens.
- ``target="matrix"``: each replaced linear's output inside the student layer (student inputs) must match
  the teacher linear's output on the teacher's inputs; loss: Σ over matrices of ‖Δy‖² / ‖y_teacher‖².

Only the factor parameters (and optionally their biases) receive gradients — via ``torch.autograd.grad``,
so the teacher's tensors (shared by reference with the student layer) get no ``.grad`` and are never
modified. Training uses mini-batches of stored sequences (about ``batch_tokens`` real tokens per step),
evaluates a held-out set every ``eval_every`` steps, stops after ``patience`` evaluations without
improvement and restores the best-valid factors (``train.early_stopped_adam``, the loop healing uses
too); the curves are returned.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from ..data import token_groups
from ..layerwise import LayerInputs, call_layer, to_device
from ..options import option
from ..progress import Progress, ensure_progress
from ..sliced import fused_path, part_rows
from ..student import build_student
from ..train import TrainSettings, early_stopped_adam
from .base import LayerContext, register
from .whitened import Whitened

TARGETS = ("block", "matrix")


@dataclass
class RefitSettings:
    """Adam refit of the factors, per decoder layer (see the module docstring)."""

    steps: int = option(200, minimum=0, label="steps per layer", help="refit: Adam steps per decoder layer (at most)")
    lr: float = option(1e-4, label="learning rate", help="refit: Adam learning rate")
    batch_tokens: int = option(2048, minimum=1, label="tokens per step", help="refit: real tokens per step")
    patience: int = option(3, minimum=1, help="refit: evaluations without improvement before stopping")
    target: str = option("block", choices=TARGETS,
                         help="refit: 'block' (decoder-layer outputs) or 'matrix' (each replaced linear's output)")
    train_bias: bool = option(False, flag="--refit-bias", help="refit: also train a bias on each factorised linear")
    eval_every: int = option(0, minimum=0, help="refit: steps between evaluations (0: once per pass, at most 10)")
    seed: int = option(0, derived=True, help="shuffling seed (the split seed)")

    def validate(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"unknown refit target {self.target!r}; allowed: {', '.join(TARGETS)}")
        for name in ("steps", "batch_tokens", "patience", "eval_every"):
            if int(getattr(self, name)) < 0 or (name in ("batch_tokens", "patience") and getattr(self, name) < 1):
                raise ValueError(f"refit {name}={getattr(self, name)!r} must be a positive integer")
        if not self.lr > 0:
            raise ValueError(f"refit lr {self.lr!r} must be > 0")

    def to_dict(self) -> dict:
        return asdict(self)


def factor_parameters(modules: dict[str, nn.Module], train_bias: bool = False) -> list[nn.Parameter]:
    """The trainable tensors of low-rank modules: ``down.weight``, ``up.weight`` (+ ``up.bias``)."""
    params = []
    for mod in modules.values():
        params += [mod.down.weight, mod.up.weight]
        if train_bias and mod.up.bias is not None:
            params.append(mod.up.bias)
    return params


class _OutputTap:
    """Forward hooks recording the outputs of named submodules."""

    def __init__(self, root: nn.Module, names: list[str]):
        self.out: dict[str, torch.Tensor] = {}
        mods = dict(root.named_modules())
        self.handles = [mods[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(_mod, _inp, out):
            self.out[name] = out
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


class BlockObjective:
    """Loss of a student decoder layer against teacher targets, summed over real tokens.

    ``student_inputs``: the student stream entering the layer; ``teacher_outputs``: the teacher layer's
    outputs on the teacher stream (block target). For the matrix target, ``teacher_layer`` and
    ``teacher_inputs`` give each replaced linear's teacher output, and ``names`` are the replaced
    linears' paths relative to the layer.
    """

    def __init__(self, student_layer: nn.Module, index: int, target: str, student_inputs: LayerInputs,
                 teacher_outputs: list[torch.Tensor], device, teacher_layer: Optional[nn.Module] = None,
                 teacher_inputs: Optional[LayerInputs] = None, names: Optional[list[str]] = None):
        self.layer, self.index, self.target, self.device = student_layer, index, target, torch.device(device)
        self.inputs, self.targets = student_inputs, teacher_outputs
        self.teacher_layer, self.teacher_inputs, self.names = teacher_layer, teacher_inputs, names or []
        if target == "matrix" and (teacher_layer is None or teacher_inputs is None or not self.names):
            raise ValueError("refit target 'matrix' needs the teacher layer, its inputs and the replaced names")
        parts = {n: student_layer.get_submodule(n) for n in self.names}   # a part's teacher output: its fused rows
        self.teacher_taps = {n: (fused_path(n, m), part_rows(m)) for n, m in parts.items()}

    def batch_loss(self, b: int) -> tuple[torch.Tensor, int]:
        """(summed loss of batch ``b`` — differentiable w.r.t. the student factors, real tokens)."""
        kw = to_device(self.inputs.layer_kwargs[b][self.index], self.device)
        mask = self.inputs.masks[b].to(self.device)
        x = self.inputs.hidden[b].to(self.device)
        if self.target == "block":
            y = call_layer(self.layer, x, kw)
            t = self.targets[b].to(self.device)
            d = (y - t)[mask].float()
            return (d * d).sum() / d.shape[-1], int(mask.sum())
        tap_s = _OutputTap(self.layer, self.names)
        tap_t = _OutputTap(self.teacher_layer, sorted({path for path, _ in self.teacher_taps.values()}))
        try:
            call_layer(self.layer, x, kw)
            with torch.no_grad():
                call_layer(self.teacher_layer, self.teacher_inputs.hidden[b].to(self.device), kw)
        finally:
            tap_s.close()
            tap_t.close()
        loss = 0.0
        for n in self.names:
            path, rows = self.teacher_taps[n]
            yt = tap_t.out[path] if rows is None else tap_t.out[path][..., rows[0]:rows[1]]
            ys, yt = tap_s.out[n][mask].float(), yt[mask].float()
            loss = loss + ((ys - yt) ** 2).sum() / (yt * yt).sum().clamp_min(1e-30) * int(mask.sum())
        return loss, int(mask.sum())

    @torch.no_grad()
    def mean_loss(self, batches: list[int]) -> float:
        total, tokens = 0.0, 0
        for b in batches:
            loss, n = self.batch_loss(b)
            total, tokens = total + float(loss), tokens + n
        return total / max(1, tokens)


def refit_layer(objective: BlockObjective, params: list[nn.Parameter], train: list[int], valid: list[int],
                settings: RefitSettings, progress: Optional[Progress] = None, label: str = "refit") -> dict:
    """Adam on ``params`` over the ``train`` batches of ``objective``; early stopping on ``valid``.

    Returns the curve ``{"train": [...], "valid": [...], "eval_steps": [...], "best_step", "initial_valid",
    "best_valid", "steps"}`` (losses are per real token). The best-valid parameters are restored in place.
    With no valid batches, the train loss of each evaluation window decides.
    """
    progress = ensure_progress(progress)
    tokens = [int(m.sum()) for m in objective.inputs.masks]
    steps_per_pass = len(token_groups(train, tokens, settings.batch_tokens))
    eval_every = settings.eval_every or max(1, min(steps_per_pass, 10))
    score = (lambda: objective.mean_loss(valid)) if valid else (lambda: objective.mean_loss(train))

    def gradient(group):
        """The step's gradient: Σ over its batches of d(summed loss / the step's real tokens)."""
        n_tok = sum(tokens[b] for b in group)
        grads = [torch.zeros_like(p) for p in params]
        step_loss = 0.0
        for b in group:
            loss, _ = objective.batch_loss(b)
            for g, d in zip(grads, torch.autograd.grad(loss / max(1, n_tok), params)):
                g += d
            step_loss += float(loss.detach())
        return grads, step_loss / max(1, n_tok)

    def on_step(state):
        progress(min(state.step, settings.steps), settings.steps, f"{label} loss {state.best_valid:.3g}")

    loop = TrainSettings(lr=settings.lr, eval_every=eval_every, patience=settings.patience,
                         batch_tokens=settings.batch_tokens, steps=settings.steps, seed=settings.seed)
    state = early_stopped_adam(params, train, tokens, gradient, score, loop, on_step=on_step)
    c = state.curve
    return {"train": c["train"], "valid": c["valid"], "eval_steps": c["eval_steps"], "best_step": state.best_step,
            "initial_valid": state.initial_valid, "best_valid": state.best_valid, "steps": state.step}


@register
class Refit(Whitened):
    """The whitened closed form (inherited ``factorize``), then :meth:`refine_layer`."""

    name = "refit"
    summary = "whitened, then a sequential block-level Adam refit of each decoder layer (student's inputs)"
    order = 2
    sequential = True
    settings_class = RefitSettings

    def refine_layer(self, ctx: LayerContext, names: list[str], progress: Progress) -> Optional[dict]:
        """Block-level refit of ``names`` in float32 (``ctx.settings.of("refit")``); ``ctx.factors`` updated in place."""
        rs = ctx.settings.of(self.name)
        if rs.steps <= 0:
            return None
        work, new = ctx.layer, ctx.factors
        layer32 = work if next(work.parameters()).dtype == torch.float32 else copy.deepcopy(work).float()
        trained = {rel: (m if m.down.weight.dtype == torch.float32 else copy.deepcopy(m).float())
                   for rel, m in new.items()}
        student = build_student(layer32, trained)
        s_in = ctx.inputs.with_hidden([x.float() if x.dtype != torch.float32 else x for x in ctx.student_in])
        targets = [y.float() if y.dtype != torch.float32 else y for y in ctx.teacher_out]
        teacher_in = ctx.inputs.with_hidden([x.float() for x in ctx.teacher_in]) if rs.target == "matrix" else None
        objective = BlockObjective(student, ctx.index, rs.target, s_in, targets, ctx.device, teacher_layer=layer32,
                                   teacher_inputs=teacher_in, names=names)
        params = factor_parameters({n: trained[n] for n in names}, rs.train_bias)
        for p in params:
            p.requires_grad_(True)
        curve = refit_layer(objective, params, ctx.fit, ctx.held_out, rs, progress=progress,
                            label=f"refit layer {ctx.index}")
        for p in params:
            p.requires_grad_(False)
        for rel in names:
            src = trained[rel]
            if src is not new[rel]:
                new[rel].load_state_dict({k: v.to(new[rel].down.weight.dtype) for k, v in src.state_dict().items()})
        return curve
