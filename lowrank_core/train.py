"""The one early-stopped Adam loop: healing (``heal.py``) and the per-layer refit (``methods/refit.py``).

``early_stopped_adam(params, batches, tokens, gradient, score, settings)`` walks seeded shuffles of the
training batches (indices), cut into steps of about ``settings.batch_tokens`` real tokens
(``data.token_groups``); per step ``gradient(group)`` returns the gradients to apply (one per parameter, the
caller's own scaling: heal divides the summed gradient by the scored tokens, refit sums the gradients of
per-step-normalised losses) and the step's train loss per token; one Adam step follows. Every
``settings.eval_every`` steps — and at the last one — ``score()`` (held-out loss per token) is appended to
the curve; an improvement keeps a copy of the parameters, ``settings.patience`` evaluations without one
stop the loop. The budget is ``settings.steps`` optimiser steps and/or ``settings.tokens`` real training
tokens (whichever is reached first). The best-scoring parameters are copied back in place at the end.

Resuming (heal's checkpoints): pass the ``optimizer`` with its moments restored, the saved
:class:`TrainState` and the best tensors; the steps already taken are skipped in the same seeded data
order, so a resumed run continues the straight one. ``on_eval(state, best)`` runs after each evaluation
(heal saves its checkpoint there), ``on_step(state)`` after each step (progress reports).

Memory: the parameters, Adam's two moments, one gradient accumulator per parameter and one copy of the
best parameters (all the size of ``params``), plus whatever ``gradient`` and ``score`` hold.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .data import token_groups


@dataclass
class TrainSettings:
    """The loop's knobs: Adam ``lr``; ``eval_every`` steps between evaluations (>= 1); ``patience``
    evaluations without improvement before stopping; budget ``steps`` and/or ``tokens`` (None: no limit of
    that kind; at least one must be set); ``batch_tokens`` real tokens per step; ``seed`` of the shuffles."""

    lr: float
    eval_every: int
    patience: int
    batch_tokens: int
    steps: Optional[int] = None
    tokens: Optional[int] = None
    seed: int = 0


@dataclass
class TrainState:
    """Where a run stands (JSON-ready: heal's checkpoint ``heal.json`` holds these fields).

    ``curve``: ``train`` (per step), ``valid`` (per evaluation, the first before any step), ``eval_steps``
    and ``eval_tokens`` (step and training tokens of each evaluation)."""

    step: int = 0
    seen: int = 0
    bad: int = 0
    curve: dict = field(default_factory=dict)
    initial_valid: float = float("nan")
    best_valid: float = float("nan")
    best_step: int = 0

    @classmethod
    def start(cls, initial: float) -> "TrainState":
        return cls(curve={"train": [], "valid": [initial], "eval_steps": [0], "eval_tokens": [0]},
                   initial_valid=initial, best_valid=initial)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainState":
        return cls(**{k: data[k] for k in ("step", "seen", "bad", "curve", "initial_valid", "best_valid", "best_step")})

    def to_dict(self) -> dict:
        return asdict(self)


def _done(state: TrainState, settings: TrainSettings) -> bool:
    return (settings.steps is not None and state.step >= settings.steps) or \
        (settings.tokens is not None and state.seen >= settings.tokens)


def early_stopped_adam(params: list[nn.Parameter], batches: Sequence[int], tokens: Sequence[int],
                       gradient: Callable[[list[int]], tuple[list[torch.Tensor], float]],
                       score: Callable[[], float], settings: TrainSettings,
                       optimizer: Optional[torch.optim.Optimizer] = None, state: Optional[TrainState] = None,
                       best: Optional[list[torch.Tensor]] = None,
                       on_eval: Optional[Callable[[TrainState, list], None]] = None,
                       on_step: Optional[Callable[[TrainState], None]] = None) -> TrainState:
    """Adam on ``params`` with early stopping; see the module docstring. ``batches``: the training batch
    indices; ``tokens[b]``: real tokens of batch ``b``; ``gradient(group)`` -> (gradients, train loss per
    token) of one step; ``score()`` -> held-out loss. ``state`` / ``best`` / ``optimizer``: a run to resume
    (default: a fresh one, ``score()`` taken first). Returns the final state; ``params`` hold the best."""
    if settings.steps is None and settings.tokens is None:
        raise ValueError("early_stopped_adam needs a budget: steps or tokens")
    opt = optimizer if optimizer is not None else torch.optim.Adam(params, lr=settings.lr)
    if state is None:
        state = TrainState.start(score())
        best = [p.detach().clone() for p in params]
    elif best is None:
        raise ValueError("resuming needs the best tensors of the saved state")
    curve = state.curve
    rng = random.Random(settings.seed)
    position = 0  # steps walked through in this run's (seeded, hence repeatable) data order
    while not _done(state, settings) and state.bad < settings.patience:
        order = list(batches)
        rng.shuffle(order)
        for group in token_groups(order, tokens, settings.batch_tokens):
            position += 1
            if position <= state.step:
                continue  # consumed before the state this run resumed from
            n_tok = sum(tokens[b] for b in group)
            grads, train_loss = gradient(group)
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            opt.zero_grad(set_to_none=True)
            state.step += 1
            state.seen += n_tok
            curve["train"].append(train_loss)
            done = _done(state, settings)
            if state.step % settings.eval_every == 0 or done:
                value = score()
                curve["valid"].append(value)
                curve["eval_steps"].append(state.step)
                curve["eval_tokens"].append(state.seen)
                if value < state.best_valid:
                    state.best_valid, state.best_step, state.bad = value, state.step, 0
                    best = [p.detach().clone() for p in params]
                else:
                    state.bad += 1
                if on_eval is not None:
                    on_eval(state, best)
            if on_step is not None:
                on_step(state)
            if done or state.bad >= settings.patience:
                break
    with torch.no_grad():
        for p, b in zip(params, best):
            p.copy_(b)
    return state
