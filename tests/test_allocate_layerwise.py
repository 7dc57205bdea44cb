"""Rank allocation on the 7B path: the layer-by-layer profile (one layer's Grams alive at a time, bases in
CPU memory) equals the former all-at-once profile, and teachers dispatched by accelerate (hooks,
offloaded layers) give the same profile and allocation as the plain teacher, untouched."""
from __future__ import annotations

import copy
import gc
import math
import weakref
from dataclasses import replace

import pytest
import torch

from lowrank_core import methods
from lowrank_core.allocate import (MatrixProfile, Profile, SearchSettings, allocate, build_profile, candidate_ranks,
                                   error_curve, greedy_path, gradient_scores, low_rank_module, suffix_loss)
from lowrank_core.allocate.bases import StoredBasis
from lowrank_core.allocate.memory import profile_memory
from lowrank_core.allocate.profile import _median, _set_sensitivities, _square_error
from lowrank_core.arch import arch_of
from lowrank_core.linears import linear_map
from lowrank_core.calibrate import GramStats, collect_grams
from lowrank_core.compress import CompressSettings, calibration_data
from lowrank_core.data import IGNORE_INDEX, iter_batches
from lowrank_core.decompose import whitening
from lowrank_core.layerwise import capture_layer_inputs, is_dispatched, layer_on, run_layer, unhooked
from lowrank_core.plan import rank_for_keep
from lowrank_core.student import build_student, private_view

from test_allocate import MAX_LEN, split, trained  # noqa: F401  (the shared tiny trained model fixtures)

accelerate = pytest.importorskip("accelerate")




def _settings(probe="layer", **kw):
    return SearchSettings(probe=probe, val_max_len=MAX_LEN, compression=CompressSettings(calib=32, max_len=MAX_LEN),
                          **kw)


# ----------------------------------------------------------------------------- stored bases
@pytest.mark.parametrize("shape,kind", [((24, 40), "cholesky"), ((40, 24), "cholesky"), ((40, 24), "eigh")])
def test_stored_basis_gives_the_basis_factors_and_inner_products_without_the_gram(shape, kind):
    """A StoredBasis (no Gram; a tall matrix keeps its Gram factor, shared by the bases of one input) gives
    bit-identical factors and gradient inner products in float64, and factors within ~1e-7 in float32."""
    from lowrank_core.allocate import component_inner
    from lowrank_core.decompose import WhitenedBasis, Whitening

    g = torch.Generator().manual_seed(2)
    n = shape[1]
    X = torch.randn(200, n, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, n, dtype=torch.float64)
    G = X.T @ X - (1e3 * torch.eye(n, dtype=torch.float64) if kind == "eigh" else 0)
    W, W2 = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    wh = Whitening(G)
    basis, other = WhitenedBasis(W, wh), WhitenedBasis(W2, wh)
    assert basis.wide or wh.kind == kind
    shared = {}
    stored, stored2 = (StoredBasis.of(b, "cpu", torch.float64, shared) for b in (basis, other))
    assert (stored.factor is None) == basis.wide and stored.factor is stored2.factor   # one factor per input
    assert stored.nbytes == 8 * (min(shape) ** 2 + min(shape))
    moved = {}
    half = [b.to("cpu", torch.float32, moved) for b in (stored, stored2)]
    assert half[0].factor is half[1].factor and half[0].vectors.dtype == torch.float32
    grad = torch.randn(*shape, generator=g)
    assert torch.equal(component_inner(stored, W, grad), component_inner(basis, W, grad))
    for r in (1, 7, min(shape)):
        ref, mine = basis.factors(W, r), stored.factors(W, r)
        assert torch.equal(ref.up, mine.up) and torch.equal(ref.down, mine.down)
        approx = half[0].factors(W, r).merged()
        assert float((approx - ref.merged()).norm() / ref.merged().norm()) < 1e-5
    with pytest.raises(Exception, match="without its Gram"):
        stored.whitening.output_covariance(W)


# ----------------------------------------------------------------------------- the former profile, as it was
def _all_at_once(teacher, tokenizer, calib_examples, val_examples, settings: SearchSettings) -> Profile:
    """``build_profile`` before the layer-by-layer change (commit b870340), verbatim but for progress:
    every Gram at once (``collect_grams``), every whitening and basis kept, then the probes."""
    infos = [li for li in linear_map(teacher) if li.layer is not None and li.module in settings.modules]
    fit = calibration_data(tokenizer, calib_examples, settings.compression).fit
    grams = collect_grams(teacher, fit, infos)
    whitenings = {key: whitening(stats) for key, stats in grams.items()}
    del grams
    modules = dict(teacher.named_modules())
    solver = methods.get("whitened")
    matrices, bases = {}, {}
    for li in infos:
        cands = candidate_ranks(li, settings)
        if not cands:
            continue
        bases[li.name] = basis = solver.basis(modules[li.name].weight, whitenings[li.gram_key])
        probe = max(1, min(rank_for_keep(li, settings.probe_keep), cands[0]))
        matrices[li.name] = MatrixProfile(li, cands, error_curve(basis.values), probe_rank=probe)
    batches = list(iter_batches(tokenizer, val_examples, settings.val_batch_size, settings.val_max_len))
    inputs = capture_layer_inputs(teacher, batches)
    teacher_loss = suffix_loss(teacher, inputs, batches, 0, inputs.hidden)
    if settings.probe == "gradient":
        result = gradient_scores(teacher, {name: bases[name] for name in matrices}, batches)
        for name, m in matrices.items():
            m.scores = result.scores[name]
            m.tail = m.scores.tail(settings.gradient_score)
            m.probe_delta = m.predicted(m.probe_rank)
            err = m.error(m.probe_rank)
            m.sensitivity = m.probe_delta / err if err > 0 else 0.0
    else:
        _old_probe(teacher, matrices, bases, inputs, batches, teacher_loss, settings.probe)
    tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    examples = sum(len(b["input_ids"]) for b in batches)
    return Profile(matrices, whitenings, bases, inputs, batches, teacher_loss, examples, tokens, {}, settings)


def _old_probe(teacher, matrices, bases, inputs, batches, teacher_loss, mode) -> None:
    spec = arch_of(teacher)
    modules = dict(teacher.named_modules())
    hidden = inputs.hidden
    rates, local = {}, {}
    for i, layer in enumerate(spec.decoder_layers(teacher)):
        prefix = spec.layer_prefix(i)
        mine = [m for m in matrices.values() if m.info.layer == i]
        out_t = run_layer(layer, inputs, i, hidden=hidden)
        if mine:
            reps = {m.info.name[len(prefix):]: low_rank_module(modules[m.info.name], bases[m.info.name], m.probe_rank)
                    for m in mine}
            for m in mine:
                rel = m.info.name[len(prefix):]
                out = run_layer(build_student(layer, {rel: reps[rel]}), inputs, i, hidden=hidden)
                local[m.info.name] = _square_error(out, out_t, inputs)
                if mode == "matrix":
                    m.probe_delta = suffix_loss(teacher, inputs, batches, i + 1, out) - teacher_loss
            if mode == "layer":
                out = run_layer(build_student(layer, reps), inputs, i, hidden=hidden)
                joint = _square_error(out, out_t, inputs)
                delta = suffix_loss(teacher, inputs, batches, i + 1, out) - teacher_loss
                rates[i] = delta / joint if joint > 0 and delta > 0 else math.nan
        hidden = out_t
    if mode == "layer":
        fallback = _median([r for r in rates.values() if r > 0])
        for m in matrices.values():
            rate = rates[m.info.layer]
            m.probe_delta = (rate if rate > 0 else fallback) * local[m.info.name]
            m.imputed = not rate > 0
    _set_sensitivities(matrices.values())


def _assert_same_profile(a: Profile, b: Profile, rel: float = 0.0) -> None:
    """Same matrices, candidates, error curves, probe results and predictions (exactly when ``rel == 0``)."""
    assert list(a.matrices) == list(b.matrices)
    assert a.teacher_loss == b.teacher_loss and a.val_tokens == b.val_tokens
    for name, p in a.matrices.items():
        q = b.matrices[name]
        assert p.candidates == q.candidates and p.probe_rank == q.probe_rank and p.imputed == q.imputed
        assert p.errors == q.errors, name
        for x, y in ((p.probe_delta, q.probe_delta), (p.sensitivity, q.sensitivity)):
            assert x == y if rel == 0 else x == pytest.approx(y, rel=rel, abs=1e-12), name
        assert (p.tail is None) == (q.tail is None)
        if p.tail is not None:
            assert p.tail == q.tail if rel == 0 else p.tail == pytest.approx(q.tail, rel=rel, abs=1e-12)
    assert greedy_path(a.matrices) == greedy_path(b.matrices)


@pytest.fixture(scope="module")
def reference(trained, split):
    model, tok = trained
    return {probe: _all_at_once(model, tok, split.calib, split.val, _settings(probe))
            for probe in ("layer", "gradient")}


@pytest.fixture(scope="module")
def layered(trained, split):
    model, tok = trained
    return {probe: build_profile(model, tok, split.calib, split.val, _settings(probe))
            for probe in ("layer", "gradient")}


# ----------------------------------------------------------------------------- equal to the all-at-once profile
@pytest.mark.parametrize("probe", ["layer", "gradient"])
def test_layer_by_layer_profile_is_the_all_at_once_profile_bit_for_bit(trained, split, reference, layered, probe):
    """Same Gram sums (each example alone, unpadded, as collect_grams), same bases, hence identical error
    curves, probe Δloss, predictions, greedy path, found plan and verified validation loss."""
    model, tok = trained
    old, new = reference[probe], layered[probe]
    _assert_same_profile(new, old)
    assert new.whitenings == {} and all(isinstance(b, StoredBasis) for b in new.bases.values())
    for name, b in new.bases.items():
        assert torch.equal(b.values, old.bases[name].values) and torch.equal(b.vectors, old.bases[name].vectors)
        assert b.vectors.device.type == "cpu" and b.vectors.dtype == torch.float64
    budget = 0.05
    a = allocate(model, tok, split.calib, split.val, budget=budget, profile=new)
    b = allocate(model, tok, split.calib, split.val, budget=budget, profile=old)
    assert a.ranks and a.ranks == b.ranks and a.plan.to_dict() == b.plan.to_dict()
    assert a.val_loss == b.val_loss and a.verified == b.verified and a.pareto == b.pareto
    sa, sb = a.student.state_dict(), b.student.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sb)


def test_explicit_compute_device_and_offloaded_streams_change_nothing(trained, split, layered):
    """``compression.device`` (each layer copied there; ``cuda`` on the 7B path, ``cpu`` here) and
    ``offload`` (hidden streams in CPU memory) take the same code path as on a GPU machine."""
    model, tok = trained
    s = _settings()
    s = replace(s, compression=replace(s.compression, device="cpu", offload=True))
    profile = build_profile(model, tok, split.calib, split.val, s)
    _assert_same_profile(profile, layered["layer"])
    assert all(h.device.type == "cpu" for h in profile.val_inputs.hidden)
    a = allocate(model, tok, split.calib, split.val, budget=0.05, profile=profile)
    b = allocate(model, tok, split.calib, split.val, budget=0.05, profile=layered["layer"])
    assert a.ranks == b.ranks and a.val_loss == b.val_loss


def test_matrix_probe_equals_the_all_at_once_one(trained, split, layered):
    model, tok = trained
    s = _settings("matrix", modules=("v_proj", "o_proj", "down_proj"))
    _assert_same_profile(build_profile(model, tok, split.calib, split.val, s),
                         _all_at_once(model, tok, split.calib, split.val, s))


def test_float32_bases_halve_the_store_and_stay_within_tolerance(trained, split, layered):
    """float32 eigenvectors: the layer/matrix probes are unchanged (they run on the float64 bases while the
    layer is solved), the factors move by ~1e-7 relative, gradient tails and verified losses by less than
    1e-5 relative; the store is half the size (the tall matrices' Gram factors stay float64)."""
    model, tok = trained
    s64, s32 = layered["layer"], build_profile(model, tok, split.calib, split.val, _settings(basis_dtype="float32"))
    _assert_same_profile(s32, s64)   # probes: bit-identical
    assert s32.memory["basis_bytes"] == sum(b.values.numel() * 8 + b.vectors.numel() * 4 for b in s64.bases.values())
    assert all(b.vectors.dtype == torch.float32 for b in s32.bases.values())
    assert s32.memory["factor_bytes"] == s64.memory["factor_bytes"] > 0
    worst = 0.0
    modules = dict(model.named_modules())
    for name, b in s64.bases.items():
        W = modules[name].weight
        for r in s64.matrices[name].candidates:
            f64, f32 = b.factors(W, r).merged(), s32.bases[name].factors(W, r).merged()
            worst = max(worst, float((f64 - f32).norm() / f64.norm()))
    assert worst < 1e-5   # measured: see docs/7b-path.md
    a64 = allocate(model, tok, split.calib, split.val, budget=0.05, profile=s64)
    a32 = allocate(model, tok, split.calib, split.val, budget=0.05, profile=s32)
    _same_allocation(a32, a64)
    # gradient scores: float32 rounding of the eigenvectors leaks ~1e-7 of the large components into each
    # inner product, so a tail moves by ~1e-7 of the matrix's total score (the smallest tails by up to
    # ~1e-3 of themselves: near-ties of the greedy path may swap); the plan found here is the same
    g64 = layered["gradient"]
    g32 = build_profile(model, tok, split.calib, split.val, _settings("gradient", basis_dtype="float32"))
    for name, p in g64.matrices.items():
        diff = max(abs(x - y) for x, y in zip(p.tail, g32.matrices[name].tail))
        assert diff <= 1e-6 * p.tail[0], name
    b64 = allocate(model, tok, split.calib, split.val, budget=0.05, profile=g64)
    b32 = allocate(model, tok, split.calib, split.val, budget=0.05, profile=g32)
    _same_allocation(b32, b64)


def _same_allocation(a, b) -> None:
    """float32 vs float64 bases: the same plan (measured here), or, where a near-tie of the greedy path swaps
    under another CPU's rounding, plans that remove the same parameters within 1 % at a validation loss
    within 1e-3 (relative); identical plans must give the same loss within 1e-5."""
    if a.ranks == b.ranks:
        assert a.val_loss == pytest.approx(b.val_loss, rel=1e-5)
        return
    assert a.removed == pytest.approx(b.removed, rel=0.01)
    assert a.val_loss == pytest.approx(b.val_loss, rel=1e-3)


# ----------------------------------------------------------------------------- memory
def _count_live_grams(monkeypatch) -> tuple[list, list]:
    """Instrument ``GramStats.zeros``: every float64 Gram created is tracked by a weak reference, and at
    each creation the number of Grams alive is recorded (no garbage collection: a dropped Gram is freed at
    once, by reference counting)."""
    refs, alive = [], []
    original = GramStats.zeros.__func__

    def zeros(cls, in_features, device=None):
        stats = original(cls, in_features, device)
        refs.append(weakref.ref(stats.gram))
        live = [r() for r in refs if r() is not None]
        alive.append((len(live), sum(t.numel() * t.element_size() for t in live)))
        del live
        return stats

    monkeypatch.setattr(GramStats, "zeros", classmethod(zeros))
    return refs, alive


@pytest.mark.parametrize("probe", ["layer", "gradient"])
def test_at_most_one_layers_grams_are_alive(monkeypatch, split, probe):
    """On a 4-layer model (4 Gram keys per layer) never more than 4 float64 Grams are alive at once, none
    once the profile is built; the all-at-once profile holds all 16 (so this test tells them apart)."""
    from lowrank_core.models import tiny_model

    model, tok = tiny_model("llama", seed=0, layers=4)
    s = _settings(probe, modules=("q_proj", "o_proj", "gate_proj", "down_proj"))
    refs, alive = _count_live_grams(monkeypatch)
    profile = build_profile(model, tok, split.calib[:8], split.val[:4], s)
    gc.collect()
    mem = profile.memory
    assert len(refs) == 16 and max(n for n, _ in alive) <= 4 and not any(r() is not None for r in refs)
    assert max(b for _, b in alive) == mem["gram_bytes_peak"] == profile_memory(model, modules=s.modules)["gram_layer"]
    assert mem["gram_bytes_all_layers"] == 4 * mem["gram_bytes_peak"] > 0
    refs.clear(), alive.clear()
    old = _all_at_once(model, tok, split.calib[:8], split.val[:4], s)
    gc.collect()
    assert max(n for n, _ in alive) == 16 and sum(r() is not None for r in refs) == 16   # kept by old.whitenings
    assert max(b for _, b in alive) == mem["gram_bytes_all_layers"]
    del old


def test_memory_table_of_mistral_7b(mistral_config):
    """The numbers of docs/7b-path.md's allocation table, from shapes (no weights)."""
    from lowrank_core.linears import meta_model

    model = meta_model(mistral_config)
    m = profile_memory(model)
    assert m["layers"] == 32 and m["matrices"] == 224
    assert m["gram_layer"] == 8 * (3 * 4096 ** 2 + 14336 ** 2) == 2_046_820_352
    assert m["gram_all_layers"] == 32 * m["gram_layer"]
    vectors, values = 5 * 4096 ** 2 + 2 * 1024 ** 2, 5 * 4096 + 2 * 1024     # per layer: q, o, gate, up, down; k, v
    assert m["bases_float64"] == 32 * (8 * vectors + 8 * values) == 22_017_474_560
    assert m["bases_float32"] == 32 * (4 * vectors + 8 * values) == 11_011_620_864
    assert m["factors_all_layers"] == 32 * 8 * 4096 ** 2
    assert m["teacher"] == 2 * 7_241_748_480
    assert m["all_at_once"] == m["gram_all_layers"] + m["factors_all_layers"] + m["bases_float64"] > 91e9
    assert m["gram_phase"] > m["probe_phase"] and 19e9 < m["peak_gpu_teacher_on_gpu"] < 20e9
    assert m["peak_gpu_teacher_on_cpu"] < 5.1e9 and m["peak_cpu_bases"] == m["bases_float64"] + m["factors_all_layers"]
    assert profile_memory(model, basis_bytes=4)["peak_cpu_bases"] == m["bases_float32"] + m["factors_all_layers"]


def test_profile_reports_its_memory_as_the_shape_formulas_say(trained, layered):
    p, model = layered["layer"], trained[0]
    mem, est = p.memory, profile_memory(model)
    assert mem["basis_bytes"] == sum(b.values.numel() * 8 + b.vectors.numel() * 8 for b in p.bases.values())
    assert mem["factor_bytes"] > 0 and mem["gram_bytes_peak"] * 2 == mem["gram_bytes_all_layers"]
    assert len(p.matrices) == est["matrices"]   # every eligible matrix has a candidate rank on this model
    assert (mem["gram_bytes_peak"], mem["gram_bytes_all_layers"]) == (est["gram_layer"], est["gram_all_layers"])
    assert (mem["basis_bytes"], mem["factor_bytes"]) == (est["bases_float64"], est["factors_all_layers"])


# ----------------------------------------------------------------------------- dispatched teachers
def _dispatch(model, kind: str, tmp_path):
    """A dispatched copy of ``model``: ``hooks`` (accelerate hooks, every module on CPU), ``disk`` (decoder
    layer 1 offloaded to disk: meta parameters) or ``cpu_offload`` (every weight offloaded, meta)."""
    twin = copy.deepcopy(model)
    if kind == "cpu_offload":
        return accelerate.cpu_offload(twin, execution_device="cpu")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    if kind == "disk":
        device_map["model.layers.1"] = "disk"
        return accelerate.dispatch_model(twin, device_map=device_map, offload_dir=str(tmp_path / "offload"))
    return accelerate.dispatch_model(twin, device_map=device_map, force_hooks=True)


def _logits(model, batches):
    with torch.no_grad():
        return [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches]


@pytest.mark.parametrize("kind", ["hooks", "disk", "cpu_offload"])
def test_dispatched_teacher_gives_the_same_profile_and_allocation(trained, split, layered, tmp_path, kind):
    model, tok = trained
    teacher = _dispatch(model, kind, tmp_path)
    assert is_dispatched(teacher)
    meta = [n for n, p in teacher.named_parameters() if p.device.type == "meta"]
    assert bool(meta) == (kind != "hooks")
    batches = list(iter_batches(tok, split.val[:4], 4, MAX_LEN))
    before = _logits(teacher, batches)
    profile = build_profile(teacher, tok, split.calib, split.val, _settings())
    _assert_same_profile(profile, layered["layer"])
    a = allocate(teacher, tok, split.calib, split.val, budget=0.05, profile=profile)
    b = allocate(model, tok, split.calib, split.val, budget=0.05, profile=layered["layer"])
    assert a.ranks == b.ranks and a.val_loss == b.val_loss
    # the teacher is as it was: same hooks, offloaded tensors still offloaded, same outputs
    assert [n for n, p in teacher.named_parameters() if p.device.type == "meta"] == meta
    assert all(torch.equal(x, y) for x, y in zip(_logits(teacher, batches), before))


def test_gradient_probe_on_a_dispatched_teacher(trained, split, layered, tmp_path):
    model, tok = trained
    profile = build_profile(_dispatch(model, "hooks", tmp_path), tok, split.calib, split.val, _settings("gradient"))
    _assert_same_profile(profile, layered["gradient"])
    with pytest.raises(ValueError, match="offloaded by accelerate"):
        build_profile(_dispatch(model, "disk", tmp_path), tok, split.calib, split.val, _settings("gradient"))


def test_from_pretrained_with_a_device_map(trained, split, layered, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = trained
    model.save_pretrained(tmp_path / "tiny")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", device_map=device_map, dtype=torch.float32,
                                                  offload_folder=str(tmp_path / "offload")).eval()
    assert getattr(loaded, "hf_device_map", None) and is_dispatched(loaded)
    _assert_same_profile(build_profile(loaded, tok, split.calib, split.val, _settings()), layered["layer"])


def test_private_view_and_unhooked_copies_with_accelerate_hooks(trained, split, tmp_path):
    """private_view deep-copies the hooks too (a working view; for an offloaded model that includes the
    hooks' weights maps), while ``unhooked`` / ``layer_on`` give hook-free copies sharing the tensors."""
    model, tok = trained
    batches = list(iter_batches(tok, split.val[:2], 2, MAX_LEN))
    for kind in ("hooks", "disk"):
        teacher = _dispatch(model, kind, tmp_path / kind)
        ref = _logits(teacher, batches)
        view = private_view(teacher)
        assert all(torch.equal(x, y) for x, y in zip(_logits(view, batches), ref))
        assert all(torch.equal(x, y) for x, y in zip(_logits(teacher, batches), ref))
        plain = unhooked(teacher)
        assert not is_dispatched(plain)
        assert all(torch.equal(x, y) for x, y in zip(_logits(plain, batches), ref))
        shared = {id(p) for p in teacher.parameters()}
        real = [p for p in plain.parameters() if id(p) in shared]
        assert len(real) == sum(p.device.type != "meta" for p in teacher.parameters())
        layer = arch_of(teacher).decoder_layers(teacher)[1]
        work = layer_on(layer, "cpu")
        assert work is not layer and not is_dispatched(work) and "_hf_hook" in layer.__dict__
    cpu_offloaded = _dispatch(model, "cpu_offload", tmp_path)
    linear = unhooked(cpu_offloaded, "model.layers.0.mlp.down_proj")
    assert torch.equal(linear.weight, model.model.layers[0].mlp.down_proj.weight)
    assert cpu_offloaded.model.layers[0].mlp.down_proj.weight.device.type == "meta"
