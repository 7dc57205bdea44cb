"""The gradient probe (``allocate/gradient.py``): per-component scores of the whitened singular
components from one backward pass per validation example, checked against exact identities, finite
differences of the validation loss, and a budgeted search on a tiny Llama briefly trained on chatterbot."""
from __future__ import annotations

import argparse
import copy
import json
import types
from dataclasses import replace

import pytest
import torch

from lowrank_core.allocate import (GRADIENT_SCORES, PROBES, ComponentScores, SearchSettings, allocate,
                                   build_profile, component_inner, gradient_scores, greedy_path)
from lowrank_core.allocate.gradient import example_gradients, example_loss
from lowrank_core.linears import count_parameters
from lowrank_core.compress import CompressSettings
from lowrank_core.data import IGNORE_INDEX, iter_batches, make_split
from lowrank_core.decompose import WhitenedBasis, Whitening
from lowrank_core.evaluate import evaluate
from lowrank_core.plan import account, load_plan

from test_allocate import MAX_LEN, split, trained  # noqa: F401  (the shared tiny trained model fixtures)


@pytest.fixture(scope="module")
def settings():
    return SearchSettings(probe="gradient", val_max_len=MAX_LEN, compression=CompressSettings(calib=32, max_len=MAX_LEN))


@pytest.fixture(scope="module")
def snapshot(trained):
    """The teacher's tensors before any gradient pass."""
    return {k: v.clone() for k, v in trained[0].state_dict().items()}


@pytest.fixture(scope="module")
def profile(trained, split, settings, snapshot):
    model, tok = trained
    return build_profile(model, tok, split.calib, split.val, settings)


def _tokens(batches) -> int:
    return sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)


def _float64_copy(model):
    """A float64 copy computing in float64 throughout: transformers' RMSNorm rounds through float32, which
    would put ~1e-8 of noise on a loss difference of ~1e-8 (ε = 1e-3 times a slope of 1e-5)."""
    copy64 = copy.deepcopy(model).double()

    def rms(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    for module in copy64.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(rms, module)
    return copy64


def _val_loss(model, batches) -> float:
    """Mean answer loss with the probe's own loss function (CE in the model's dtype, float64 here)."""
    total = 0.0
    with torch.no_grad():
        for b in batches:
            for e in range(len(b["input_ids"])):
                n = int(b["attention_mask"][e].sum())
                if (b["labels"][e, 1:n] != IGNORE_INDEX).any():
                    total += float(example_loss(model, b["input_ids"][e:e + 1, :n], b["labels"][e:e + 1, :n]))
    return total / _tokens(batches)


# ----------------------------------------------------------------------------- maths on small matrices
def _gram(n: int, kind: str, g: torch.Generator) -> torch.Tensor:
    X = torch.randn(200, n, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, n, dtype=torch.float64)
    G = X.T @ X
    return G - 1e3 * torch.eye(n, dtype=torch.float64) if kind == "eigh" else G   # indefinite: eigh fallback


@pytest.mark.parametrize("shape,kind", [((24, 40), "cholesky"), ((40, 24), "cholesky"), ((40, 24), "eigh")])
def test_component_inner_products_are_those_of_the_rank1_terms(shape, kind):
    """Component i is W_{i+1} − W_i (W_r the whitened rank-r truncation, W_0 = 0, W_k = W): the components
    sum to every truncation exactly and ``component_inner`` gives ⟨g, W_i⟩ without forming them."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(*shape, generator=g, dtype=torch.float64)
    wh = Whitening(_gram(shape[1], kind, g))
    basis = WhitenedBasis(W, wh)
    assert basis.wide or wh.kind == kind   # the wide branch never needs a factor of G
    k = min(shape)
    truncs = [torch.zeros_like(W)] + [basis.factors(W, r).merged() for r in range(1, k + 1)]
    assert torch.allclose(truncs[-1], W, atol=1e-9 * float(W.abs().max()))
    comps = [truncs[i + 1] - truncs[i] for i in range(k)]
    grad = torch.randn(*shape, generator=g, dtype=torch.float64)
    inner = component_inner(basis, W, grad)
    expected = torch.stack([(grad * c).sum() for c in comps])
    assert inner.shape == (k,)
    assert torch.allclose(inner, expected, rtol=1e-7, atol=1e-9 * float(expected.abs().max()))
    for r in (1, 5, k - 1):   # Σ_{i≥r} ⟨g, W_i⟩ = ⟨g, W − W_r⟩
        assert float(inner[r:].sum()) == pytest.approx(float((grad * (W - truncs[r])).sum()), rel=1e-8, abs=1e-9)


def test_tails_are_non_negative_and_non_increasing():
    s = ComponentScores(first=torch.tensor([-0.5, 0.2, -0.1, 0.0], dtype=torch.float64),
                        fisher=torch.tensor([0.3, 0.1, 0.0, 0.05], dtype=torch.float64))
    assert s.tail("taylor") == pytest.approx([1.25, 0.45, 0.15, 0.05, 0.0])
    assert s.tail("fisher") == pytest.approx([0.45, 0.15, 0.05, 0.05, 0.0])
    assert s.first_order(1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="'hessian'"):
        s.score("hessian")
    with pytest.raises(ValueError, match="'hessian'"):
        SearchSettings(probe="gradient", gradient_score="hessian").validate()
    assert "gradient" in PROBES and set(GRADIENT_SCORES) == {"taylor", "fisher"}


# ----------------------------------------------------------------------------- on the trained tiny model
def test_first_order_sums_are_the_gradient_inner_product(trained, profile):
    """Σ_{i≥r} first_i = −⟨g, W − W_r⟩ with g the gradient of the mean validation loss (summed from the
    per-example gradients), for every matrix and candidate rank; the Fisher term is ½(1/N)Σ_e⟨G_e, W_i⟩²."""
    model, _ = trained
    modules = dict(model.named_modules())
    weights = {name: modules[name].weight for name in profile.matrices}
    N = _tokens(profile.val_batches)
    g = {name: torch.zeros_like(w, dtype=torch.float64) for name, w in weights.items()}
    name0 = "model.layers.1.mlp.up_proj"                 # a tall matrix: its Fisher term by hand
    sq = torch.zeros(len(profile.bases[name0].values), dtype=torch.float64)
    examples = 0
    for _, _, grads in example_gradients(model, weights, profile.val_batches):
        examples += 1
        for name, grad in grads.items():
            g[name] += grad.double() / N
        sq += component_inner(profile.bases[name0], weights[name0], grads[name0]) ** 2
    assert examples == len([1 for b in profile.val_batches for row in b["labels"] if (row[1:] != IGNORE_INDEX).any()])
    fisher = profile.matrices[name0].scores.fisher
    assert torch.allclose(fisher, 0.5 * sq / N, rtol=1e-6, atol=1e-18)
    for name, m in profile.matrices.items():
        W = weights[name].double()
        for r in m.candidates:
            direct = -float((g[name] * (W - profile.bases[name].factors(W, r).merged())).sum())
            assert m.scores.first_order(r) == pytest.approx(direct, rel=1e-6, abs=1e-12), (name, r)


def test_first_order_agrees_with_finite_differences(trained, profile):
    """The first-order prediction of removing a tail, −⟨g, W − W_r⟩ = Σ_{i≥r} first_i, against the measured
    slope of the validation loss along W_ε = W − ε(W − W_r) at ε = 1e-3 (a float64 copy of the model;
    the scores themselves come from the float32 teacher)."""
    model, _ = trained
    model64 = _float64_copy(model)
    modules = dict(model64.named_modules())
    batches = profile.val_batches
    base = _val_loss(model64, batches)
    assert base == pytest.approx(profile.teacher_loss, abs=1e-5)
    eps, checked = 1e-3, 0
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj",
                 "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.down_proj"):
        m, weight = profile.matrices[name], modules[name].weight
        W = weight.detach().clone()
        for r in (m.candidates[-1], m.candidates[len(m.candidates) // 2]):
            predicted = m.scores.first_order(r)
            tail = W - profile.bases[name].factors(W, r).merged()
            losses = {}
            for sign in (1, -1):
                weight.data.copy_(W - sign * eps * tail)
                losses[sign] = _val_loss(model64, batches)
            weight.data.copy_(W)
            forward = (losses[1] - base) / eps
            central = (losses[1] - losses[-1]) / (2 * eps)
            assert central == pytest.approx(predicted, rel=1e-3), (name, r, central, predicted)
            assert forward == pytest.approx(predicted, rel=1e-2), (name, r, forward, predicted)
            checked += 1
    assert checked == 8


def test_profile_predictions_are_tails_of_scores(trained, profile, snapshot):
    model, _ = trained
    rows = [m.row() for m in profile.matrices.values()]
    assert all("first_order" in r and r["fisher"] >= 0 for r in rows)
    for m in profile.matrices.values():
        k = len(profile.bases[m.info.name].values)
        assert len(m.tail) == k + 1 and m.tail[k] == 0.0 and m.predicted(None) == 0.0
        preds = [m.predicted(r) for r in range(k + 1)]
        assert all(a >= b >= 0 for a, b in zip(preds, preds[1:]))
        assert preds == pytest.approx(m.scores.tail("taylor"))
        assert m.probe_delta == m.predicted(m.probe_rank)
    steps = greedy_path(profile.matrices)
    assert steps and all(s.cost >= 0 for s in steps)
    # one backward per example: its loss is the profile's teacher loss; the teacher is as it was
    result = gradient_scores(model, {n: profile.bases[n] for n in list(profile.matrices)[:2]}, profile.val_batches)
    assert result.loss == pytest.approx(profile.teacher_loss, abs=1e-5)
    assert result.tokens == profile.val_tokens
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())


def test_fisher_score_is_the_second_order_part(trained, split, settings, profile):
    model, tok = trained
    fisher = build_profile(model, tok, split.calib, split.val, replace(settings, gradient_score="fisher"))
    for name, m in fisher.matrices.items():
        t = profile.matrices[name]
        assert torch.equal(m.scores.fisher, t.scores.fisher) and torch.equal(m.scores.first, t.scores.first)
        assert m.tail == pytest.approx(m.scores.tail("fisher"))
        assert all(f <= tt for f, tt in zip(m.tail, t.tail))


def test_allocate_with_gradient_probe_meets_a_binding_budget(trained, split, settings, profile, snapshot):
    model, tok = trained
    full = allocate(model, tok, split.calib, split.val, budget=10.0, profile=profile)
    assert full.steps == full.path_length and full.val_loss > full.teacher_loss
    budget = (full.val_loss - full.teacher_loss) / 3
    result = allocate(model, tok, split.calib, split.val, budget=budget, profile=profile)
    assert result.ranks and result.steps < result.path_length
    assert result.val_loss - result.teacher_loss <= budget
    kw = dict(batch_size=settings.val_batch_size, max_len=settings.val_max_len)
    teacher, student = evaluate(model, tok, split.val, **kw).loss, evaluate(result.student, tok, split.val, **kw).loss
    assert student == pytest.approx(result.val_loss, abs=1e-5) and student - teacher <= budget + 1e-6
    acc = account(model, load_plan(json.loads(json.dumps(result.plan.to_dict()))))
    assert acc.compressed == result.params_after == count_parameters(result.student)
    assert not acc.warnings
    assert all(r["rank"] <= r["break_even_rank"] and r["params_after"] < r["params_before"] for r in acc.rows)
    target = allocate(model, tok, split.calib, split.val, budget=None, target_params=int(0.9 * full.params_before),
                      profile=profile)
    assert target.params_after <= int(0.9 * full.params_before)
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())


def test_requires_grad_flags_are_restored():
    """A teacher whose weights require grad (a freshly built model) keeps its flags and gets no ``.grad``."""
    from lowrank_core.models import tiny_model

    model, tok = tiny_model("llama", seed=0)
    split = make_split("chatterbot", n_calib=4, n_eval=4, n_val=4, seed=0)
    batches = list(iter_batches(tok, split.val, 4, 64))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    flags["model.layers.0.self_attn.q_proj.weight"] = False
    X = torch.randn(50, 64, dtype=torch.float64)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
    modules = dict(model.named_modules())
    bases = {n: WhitenedBasis(modules[n].weight, X.T @ X) for n in names}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gradient_scores(model, bases, batches)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_search_with_gradient_probe(capsys):
    from lowrank_core.cli import build_parser, main

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    probe = next(a for a in sub.choices["search"]._actions if a.dest == "probe")
    assert list(probe.choices) == list(PROBES) and "gradient" in probe.choices
    common = ["--model", "tiny", "--data", "chatterbot", "--calib", "16", "--eval", "8", "--max-len", "96"]
    rc = main(["search", *common, "--val", "8", "--val-max-len", "96", "--budget", "2%", "--probe", "gradient",
               "--json"])
    assert rc == 0
    record = json.loads(capsys.readouterr().out)
    assert record["val_loss"] - record["teacher_val_loss"] <= record["budget"]
    assert record["matrices"] and all("first_order" in row for row in record["matrices"])
    assert record["params_after"] <= record["params_before"] and "eval_loss" in record
