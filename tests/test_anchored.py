"""``anchored``: the rank-r minimiser of ‖W X_tᵀ − W′ X_sᵀ‖² (teacher's outputs from the student's inputs),
checked on random matrices against brute force, then on a tiny model against whitened, measured here
with hooks on the HF models themselves (not with the method's code)."""
from __future__ import annotations

import pytest
import torch

from lowrank_core import layerwise as lw
from lowrank_core import decompose, methods
from lowrank_core.linears import linear_map
from lowrank_core.compress import CompressSettings, calibration_data, compress
from lowrank_core.layerwise import gram_pass
from lowrank_core.data import make_split
from lowrank_core.decompose import whitened_factors
from lowrank_core.lowrank import LowRankLinear
from lowrank_core.methods.anchored import anchored_factors, anchored_target, input_keys
from lowrank_core.models import tiny_model
from lowrank_core.plan import load_plan, resolve_plan
from lowrank_core.student import changed_tensors, state_checksums


# ----------------------------------------------------------------------------- the maths
def _objective(W, Wp, Xt, Xs) -> float:
    return float(((Xt @ W.T - Xs @ Wp.T) ** 2).sum())


def _brute_force(W, Xt, Xs, rank):
    """Rank-r minimiser without Grams: with X_s = Q R, ‖Y − W′X_sᵀ‖² = ‖YQ − W′Rᵀ‖² + const (Y = W X_tᵀ),
    so W′Rᵀ is the truncated SVD of YQ (Eckart–Young)."""
    Q, R = torch.linalg.qr(Xs)
    U, S, Vh = torch.linalg.svd((W @ Xt.T) @ Q)
    B = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    return torch.linalg.solve_triangular(R.T, B, upper=False, left=False)


def _streams(n_in, tokens, noise, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n_in, dtype=torch.float64)
    Xt = torch.randn(tokens, n_in, generator=g, dtype=torch.float64) @ mix
    Xs = Xt + noise * torch.randn(tokens, n_in, generator=g, dtype=torch.float64) @ mix + 0.05 * Xt.roll(1, 0)
    return Xt, Xs, g


@pytest.mark.parametrize("out_f,in_f", [(12, 20), (30, 16)])   # wide (eigen form) and tall (Cholesky form)
def test_closed_form_is_the_brute_force_optimum(out_f, in_f):
    Xt, Xs, g = _streams(in_f, 300, 0.3, seed=out_f)
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    G, D = Xs.T @ Xs, (Xt - Xs).T @ Xs
    # the unconstrained map is least squares: W* = W C G_s⁻¹ with C = X_tᵀ X_s
    ls = torch.linalg.lstsq(Xs, Xt @ W.T).solution.T
    assert torch.allclose(anchored_target(W, G, D), ls, rtol=1e-8, atol=1e-9)
    assert torch.allclose(anchored_target(W, G, D), W @ (Xt.T @ Xs) @ torch.linalg.inv(G), rtol=1e-7, atol=1e-8)
    for rank in (1, 4, min(out_f, in_f) - 1):
        f = anchored_factors(W, G, D, rank)
        assert f.rank == rank and f.up.dtype == W.dtype
        best = _objective(W, f.merged(), Xt, Xs)
        brute = _brute_force(W, Xt, Xs, rank)
        assert torch.allclose(f.merged(), brute, rtol=1e-7, atol=1e-8)
        assert best == pytest.approx(_objective(W, brute, Xt, Xs), rel=1e-10)
        # whitened truncations of W itself (under either stream's Gram) are feasible, so no better
        for gram in (G, Xt.T @ Xt):
            assert best <= _objective(W, whitened_factors(W, gram, rank).merged(), Xt, Xs) * (1 + 1e-12)
        for _ in range(20):
            Wp = torch.randn(out_f, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, in_f, generator=g,
                                                                                           dtype=torch.float64)
            assert best <= _objective(W, Wp, Xt, Xs)
        # the Pythagoras split behind the truncation: objective = LS residual + ‖(W* − W′)X_sᵀ‖²
        residual = _objective(W, ls, Xt, Xs)
        assert best == pytest.approx(residual + float(((Xs @ (ls - f.merged()).T) ** 2).sum()), rel=1e-10)


@pytest.mark.parametrize("out_f,in_f", [(12, 20), (30, 16)])
def test_equal_streams_give_the_whitened_factors(out_f, in_f):
    Xt, _, g = _streams(in_f, 200, 0.0, seed=1)
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    G = Xt.T @ Xt
    # through the solve (a cross-Gram equal to G, up to rounding) and through the exact-zero shortcut
    nearly = anchored_target(W, G, torch.full_like(G, 1e-300))
    assert torch.allclose(nearly, W, rtol=1e-9, atol=1e-10)
    assert torch.equal(anchored_target(W, G, torch.zeros_like(G)), W)
    for rank in (2, 7):
        want = whitened_factors(W, G, rank)
        got = anchored_factors(W, G, torch.zeros_like(G), rank)
        assert torch.equal(got.merged(), want.merged())
        assert torch.allclose(anchored_factors(W, G, torch.full_like(G, 1e-300), rank).merged(), want.merged(),
                              rtol=1e-8, atol=1e-9)
    # float32 weights: factors come back in the weight's dtype
    assert anchored_factors(W.float(), G, torch.zeros_like(G), 3).up.dtype == torch.float32


def test_singular_student_gram_is_damped_and_still_optimal():
    """Fewer tokens than features: G_s is singular; the damped solve is the ridge towards W, still (up to the
    tiny damping) the optimum, and finite."""
    Xt, Xs, g = _streams(24, 10, 0.3, seed=5)
    W = torch.randn(8, 24, generator=g, dtype=torch.float64)
    G, D = Xs.T @ Xs, (Xt - Xs).T @ Xs
    f = anchored_factors(W, G, D, 4)
    assert torch.isfinite(f.merged()).all()
    best = _objective(W, f.merged(), Xt, Xs)
    assert best <= _objective(W, whitened_factors(W, G, 4).merged(), Xt, Xs)
    assert best == pytest.approx(_objective(W, _brute_force_rank_deficient(W, Xt, Xs, 4), Xt, Xs), rel=1e-4, abs=1e-6)


def test_eigh_fallback_solves_against_the_clamped_gram(monkeypatch):
    """When even damping fails (here: no damping tries, a feature the student never sees), W* is solved
    against the whitening's clamped eigendecomposition, still without an explicit inverse in the method."""
    monkeypatch.setattr(decompose, "DAMPING_TRIES", 0)
    Xt, Xs, g = _streams(10, 60, 0.2, seed=3)
    Xs[:, 4] = 0.0
    W = torch.randn(14, 10, generator=g, dtype=torch.float64)
    G, D = Xs.T @ Xs, (Xt - Xs).T @ Xs
    wh = decompose.Whitening(G)
    target = anchored_target(W, wh, D)
    assert wh.kind == "eigh"
    lam, q = torch.linalg.eigh(G)
    want = W + W @ D @ (q / lam.clamp_min(wh.damping)) @ q.T
    assert torch.allclose(target, want, rtol=1e-9, atol=1e-9)
    f = anchored_factors(W, wh, D, 5)
    assert torch.isfinite(f.merged()).all()
    assert _objective(W, f.merged(), Xt, Xs) <= _objective(W, whitened_factors(W, G, 5).merged(), Xt, Xs)


def _brute_force_rank_deficient(W, Xt, Xs, rank):
    """Rank-r minimiser when X_s has fewer rows than columns: Y Q with Q an orthonormal basis of X_s's rows."""
    U0, S0, V0h = torch.linalg.svd(Xs, full_matrices=False)          # Xs = U0 S0 V0ᵀ  (tokens x tokens)
    Y = W @ Xt.T                                                       # [out, tokens]
    U, S, Vh = torch.linalg.svd(Y @ U0)
    B = (U[:, :rank] * S[:rank]) @ Vh[:rank]                           # = W′ V0 S0
    return (B / S0) @ V0h


# ----------------------------------------------------------------------------- on a tiny model
PLAN = "all:r8"
CALIB = 12


@pytest.fixture(scope="module")
def runs():
    """A 3-layer tiny Llama compressed at one plan with anchored, whitened (fast) and whitened layer by layer."""
    torch.manual_seed(0)
    model, tok = tiny_model("llama", layers=3)
    split = make_split("chatterbot", n_calib=CALIB, n_eval=0, seed=0)
    snap = state_checksums(model)
    out = {}
    for label, method, layerwise in (("anchored", "anchored", False), ("whitened", "whitened", False),
                                      ("layerwise", "whitened", True)):
        settings = CompressSettings(method=method, calib=CALIB, max_len=64, layerwise=layerwise)
        out[label] = compress(model, tok, PLAN, split.calib, settings)
    fit = calibration_data(tok, split.calib, CompressSettings(calib=CALIB, max_len=64)).fit
    return model, tok, snap, out, fit


def _linear_inputs(teacher, batch, layer_index, names, replace_input=None):
    """Masked inputs [tokens, in] of the linears ``names`` of decoder layer ``layer_index`` in one teacher
    forward; ``replace_input``: hidden states fed to that layer instead of the teacher's own."""
    layer = lw.decoder_layers(teacher)[layer_index]
    mods = dict(teacher.named_modules())
    mask = batch["attention_mask"].bool()
    seen = {}

    def record(name):
        return lambda _m, args: seen.__setitem__(name, args[0][mask].double())

    def swap(_m, args, kwargs):
        if args:
            return (replace_input,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": replace_input}

    handles = [mods[n].register_forward_pre_hook(record(n)) for n in names]
    if replace_input is not None:
        handles.append(layer.register_forward_pre_hook(swap, with_kwargs=True))
    try:
        with torch.no_grad():
            teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def _stream_errors(teacher, student, fit, students_stream_of, layers):
    """{name: ‖W X_tᵀ − W′ X_sᵀ‖²} over the fit batches' real tokens, X_s measured on the stream of the
    student ``students_stream_of`` (teacher layer run on it), W′ from ``student``."""
    mods_t, mods_s = dict(teacher.named_modules()), dict(student.named_modules())
    errors = {}
    for batch in fit:
        with torch.no_grad():
            hs = students_stream_of(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    use_cache=False, output_hidden_states=True).hidden_states
        for i in layers:
            names = layers[i]
            xt = _linear_inputs(teacher, batch, i, names)
            xs = _linear_inputs(teacher, batch, i, names, replace_input=hs[i])
            for n in names:
                W = mods_t[n].weight.detach().double()
                Wp = mods_s[n].merged_weight().double()
                errors[n] = errors.get(n, 0.0) + float(((xt[n] @ W.T - xs[n] @ Wp.T) ** 2).sum())
    return errors


def test_anchored_beats_whitened_on_the_students_stream_and_keeps_the_teacher(runs):
    model, tok, snap, out, fit = runs
    assert changed_tensors(model, snap) == []   # three compressions later, the teacher is bit-identical
    anchored = out["anchored"]
    assert anchored.split["path"] == "layerwise"   # sequential: never the fast path
    assert {r["method"] for r in anchored.layers} == {"anchored"} and anchored.refit_curves == {}
    names = [r["name"] for r in anchored.layers]
    assert names == [r["name"] for r in out["whitened"].layers] and len(names) == 3 * 7
    assert [r["rank"] for r in anchored.layers] == [r["rank"] for r in out["layerwise"].layers]
    later = {i: [n for n in names if f".layers.{i}." in n] for i in (1, 2)}
    # X_t, X_s of anchored's own student: there its factors are the optimum, any other rank-r W′ is worse
    errs = {label: _stream_errors(model, r.student, fit, anchored.student, later) for label, r in out.items()}
    for n in errs["anchored"]:
        for other in ("whitened", "layerwise"):
            assert errs["anchored"][n] <= errs[other][n] * (1 + 1e-5) + 1e-8, (n, other, errs["anchored"][n],
                                                                               errs[other][n])
    assert sum(errs["anchored"].values()) < sum(errs["layerwise"].values())
    # layer 0 sees the teacher's own stream: the layer-by-layer whitened factors (exactly, but for down_proj,
    # which whitened measures by its output covariance and anchored by its input Gram: float32 rounding)
    mods = {label: dict(r.student.named_modules()) for label, r in out.items()}
    for n in (n for n in names if ".layers.0." in n):
        a, b = mods["anchored"][n].merged_weight(), mods["layerwise"][n].merged_weight()
        if n.endswith("down_proj"):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
        else:
            assert torch.equal(a, b)
        assert torch.allclose(mods["anchored"][n].merged_weight(), mods["whitened"][n].merged_weight(), atol=1e-5)
    # and the student is a working model different from the teacher
    ids = torch.tensor([tok.encode("hello there, how are you?")])
    with torch.no_grad():
        a, t = anchored.student(input_ids=ids).logits, model(input_ids=ids).logits
    assert a.shape == t.shape and torch.isfinite(a).all() and not torch.equal(a, t)


def test_registered_and_offered():
    assert "anchored" in methods.names()
    m = methods.get("anchored")
    assert m.needs_grams and m.sequential and m.refines and m.order == 3 and m.summary
    plan = load_plan("mlp:r4:anchored")
    assert plan.rules[0].method == "anchored"
    model, _ = tiny_model("llama")
    assignments = resolve_plan(plan, linear_map(model))
    assert assignments and {a.method for a in assignments.values()} == {"anchored"}
    assert input_keys(lw.decoder_layers(model)[0], ["self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj",
                                                    "mlp.up_proj", "mlp.down_proj", "other"]) == {
        "self_attn.q_proj": "input:attn_in", "self_attn.v_proj": "input:attn_in", "mlp.gate_proj": "input:mlp_in",
        "mlp.up_proj": "input:mlp_in", "mlp.down_proj": "input:down_in", "other": "other"}


def test_never_the_fast_path():
    model, tok = tiny_model("llama", layers=2)
    split = make_split("chatterbot", n_calib=6, n_eval=0, seed=0)
    result = compress(model, tok, "0:mlp:r4; 1:mlp:r4:anchored", split.calib,
                      CompressSettings(calib=6, max_len=64, hidden_mse=False))
    assert result.split["path"] == "layerwise"
    assert {r["method"] for r in result.layers} == {"whitened", "anchored"}


# ----------------------------------------------------------------------------- refine_layer directly
def _layer_context(model, batches, index, student_in):
    inputs = lw.capture_layer_inputs(model, batches)
    hidden = inputs.hidden
    for i in range(index):
        hidden = lw.run_layer(lw.decoder_layers(model)[i], inputs, i, hidden=hidden)
    layer = lw.decoder_layers(model)[index]
    rels = [rel for rel, _ in layer.named_modules() if rel.endswith("_proj")]
    keys = input_keys(layer, rels)
    fit = list(range(len(batches)))
    s_in = student_in(hidden)
    _, grams, _ = gram_pass(layer, inputs, index, s_in, keys, fit, "cpu", False)
    mods = dict(layer.named_modules())
    factors = {rel: LowRankLinear.from_factors(whitened_factors(mods[rel].weight.detach(), grams[keys[rel]], 6))
               for rel in rels}
    ctx = methods.LayerContext(layer, index, factors, inputs, hidden, s_in, None, fit, [], CompressSettings(),
                               torch.device("cpu"))
    return ctx, rels


@pytest.fixture(scope="module")
def small():
    model, tok = tiny_model("llama", layers=2)
    split = make_split("chatterbot", n_calib=6, n_eval=0, seed=0)
    return model, calibration_data(tok, split.calib, CompressSettings(calib=6, max_len=64)).fit


def test_refine_layer_with_equal_streams_keeps_whitened(small):
    model, batches = small
    # a different list holding the same tensors: the full statistics pass runs, and D is exactly zero
    ctx, rels = _layer_context(model, batches, 1, lambda h: list(h))
    before = {rel: ctx.factors[rel].merged_weight().clone() for rel in rels}
    keys, grams, deltas = methods.get("anchored").layer_statistics(ctx, rels)
    assert len(grams) == 4 and all(not d.any() for d in deltas.values())
    assert methods.get("anchored").refine_layer(ctx, rels, lambda *a: None) is None
    for rel in rels:
        assert torch.allclose(ctx.factors[rel].merged_weight(), before[rel], rtol=1e-5, atol=1e-6)


def test_refine_layer_replaces_weights_in_place(small):
    model, batches = small
    snap = state_checksums(model)
    g = torch.Generator().manual_seed(0)
    ctx, rels = _layer_context(model, batches, 1, lambda h: [x + 0.1 * torch.randn(x.shape, generator=g) for x in h])
    ids = {rel: (id(m), id(m.down.weight), id(m.up.weight), m.rank) for rel, m in ctx.factors.items()}
    before = {rel: ctx.factors[rel].merged_weight().clone() for rel in rels}
    calls = []
    methods.get("anchored").refine_layer(ctx, rels, lambda d, t, msg: calls.append((d, t)))
    assert calls[-1] == (len(batches), len(batches))
    assert {rel: (id(m), id(m.down.weight), id(m.up.weight), m.rank) for rel, m in ctx.factors.items()} == ids
    for rel in rels:
        m = ctx.factors[rel]
        assert m.down.weight.dtype == torch.float32 and torch.isfinite(m.merged_weight()).all()
        assert not torch.allclose(m.merged_weight(), before[rel])
        assert not m.down.weight.requires_grad or m.down.weight.grad is None
    assert changed_tensors(model, snap) == []
    assert all(not m._forward_pre_hooks for m in model.modules())   # hooks removed
