"""The one early-stopped Adam loop (heal and refit use it): budget, evaluation schedule, patience, best
restored, and a resumed run continuing the straight one bit for bit."""
from __future__ import annotations

import pytest
import torch

from lowrank_core.train import TrainSettings, TrainState, early_stopped_adam



def _problem(target_valid: float):
    """One parameter pulled to 1.0 by the training loss; the held-out loss is lowest at ``target_valid``."""
    w = torch.nn.Parameter(torch.zeros(1))

    def gradient(group):
        loss = ((w - 1.0) ** 2).sum() * len(group)
        (g,) = torch.autograd.grad(loss, [w])
        return [g / len(group)], float(loss.detach()) / len(group)

    def score():
        return float(((w.detach() - target_valid) ** 2).sum())
    return w, gradient, score


def test_steps_budget_evaluation_schedule_and_curve():
    w, gradient, score = _problem(target_valid=5.0)   # every step improves the held-out loss
    s = TrainSettings(lr=0.1, eval_every=3, patience=2, batch_tokens=4, steps=7)
    state = early_stopped_adam([w], range(4), [2, 2, 2, 2], gradient, score, s)
    assert state.step == 7 and state.seen == 28 and len(state.curve["train"]) == 7
    assert state.curve["eval_steps"] == [0, 3, 6, 7] and state.curve["eval_tokens"] == [0, 12, 24, 28]
    assert state.best_step == 7 and state.best_valid == state.curve["valid"][-1] < state.initial_valid
    assert score() == state.best_valid and 0.5 < float(w.detach()) < 1.0   # the last (best) values kept


def test_tokens_budget_stops_first():
    w, gradient, score = _problem(target_valid=5.0)
    s = TrainSettings(lr=0.1, eval_every=100, patience=2, batch_tokens=4, tokens=10, steps=50)
    state = early_stopped_adam([w], range(4), [2, 2, 2, 2], gradient, score, s)
    assert (state.step, state.seen) == (3, 12) and state.curve["eval_steps"] == [0, 3]


def test_patience_stops_and_the_best_parameters_come_back():
    w, gradient, score = _problem(target_valid=0.25)  # training overshoots the held-out optimum
    s = TrainSettings(lr=0.1, eval_every=1, patience=2, batch_tokens=4, steps=100)
    state = early_stopped_adam([w], range(4), [4, 4, 4, 4], gradient, score, s)
    assert state.step < 100 and state.bad == 2
    assert state.best_step == state.step - 2 and state.best_valid == min(state.curve["valid"])
    assert score() == state.best_valid   # the parameters hold the best evaluation's values


def test_a_resumed_run_continues_the_straight_one_exactly():
    common = dict(lr=0.05, eval_every=2, patience=100, batch_tokens=3, seed=3)
    w, gradient, score = _problem(target_valid=0.6)
    straight = early_stopped_adam([w], range(5), [1, 2, 3, 1, 2], gradient, score, TrainSettings(steps=9, **common))
    w2, gradient2, score2 = _problem(target_valid=0.6)
    opt = torch.optim.Adam([w2], lr=0.05)
    saved = {}
    early_stopped_adam([w2], range(5), [1, 2, 3, 1, 2], gradient2, score2, TrainSettings(steps=4, **common),
                       optimizer=opt, on_eval=lambda st, best: saved.update(state=st.to_dict(), best=list(best),
                                                                             w=w2.detach().clone()))
    with torch.no_grad():
        w2.copy_(saved["w"])        # where the run was at its last evaluation (the checkpoint)
    resumed = early_stopped_adam([w2], range(5), [1, 2, 3, 1, 2], gradient2, score2, TrainSettings(steps=9, **common),
                                 optimizer=opt, state=TrainState.from_dict(saved["state"]), best=saved["best"])
    assert resumed.to_dict() == straight.to_dict() and torch.equal(w, w2)


def test_a_budget_is_required():
    w, gradient, score = _problem(1.0)
    with pytest.raises(ValueError, match="budget"):
        early_stopped_adam([w], range(2), [1, 1], gradient, score, TrainSettings(lr=0.1, eval_every=1, patience=1,
                                                                                  batch_tokens=1))
