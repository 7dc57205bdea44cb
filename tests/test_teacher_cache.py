"""The teacher cache: lumped-tail KL against the full KL, keys, format versions, compare and heal reuse,
and the shared leading layers of a student run once."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from lowrank_core import data
from lowrank_core.compare import CompareSettings, compare_models, shared_forks
from contextlib import nullcontext

from lowrank_core.heal import HealSettings, batch_loss, cached_targets, heal
from lowrank_core.layerwise import decoder_inputs, head_logits, run_layers, shared_layers
from lowrank_core.lowrank import LowRankLinear
from lowrank_core.models import tiny_model
from lowrank_core.student import build_student, state_checksums
from lowrank_core.teacher_cache import (FORMAT, TeacherCache, kl_gap_bound, lumped_kl, resolve_cache, row_keys,
                                        targets_from_logp)
from lowrank_core.tempdirs import INCOMPLETE


def examples(n, seed=0):
    return [data.Example("", f"question {seed}-{i}: tell me about {i * 7 % 13}", f"answer {i} is {i % 5} and more")
            for i in range(n)]


def low_rank(model, name, rank=4, seed=1):
    linear = model.get_submodule(name)
    torch.manual_seed(seed)
    w = linear.weight.detach()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    m = LowRankLinear(w.shape[1], w.shape[0], rank, bias=False)
    with torch.no_grad():
        m.down.weight.copy_(vh[:rank] * s[:rank, None].sqrt())
        m.up.weight.copy_(u[:, :rank] * s[None, :rank].sqrt())
    return m


def student_of(model, layer=1):
    """A student replacing layer ``layer``'s down projection (the layers before it shared)."""
    name = f"model.layers.{layer}.mlp.down_proj"
    return build_student(model, {name: low_rank(model, name)})


# ----------------------------------------------------------------------------- the lumped-tail KL
@pytest.mark.parametrize("k", [1, 8, 64])
def test_lumped_kl_is_a_lower_bound_within_the_stated_gap(k):
    torch.manual_seed(0)
    t_logp = F.log_softmax(torch.randn(50, 259) * 3, -1)
    s_logp = F.log_softmax(torch.randn(50, 259) * 3, -1)
    full = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    t = targets_from_logp(t_logp, k)
    approx = lumped_kl(t, s_logp)
    gap = full - approx
    assert bool((gap >= -1e-5).all())
    assert bool((gap <= kl_gap_bound(t, s_logp) + 1e-5).all())
    assert float(gap.max()) > 1e-4   # the tail matters here: the test can fail


def test_lumped_kl_is_exact_when_k_covers_the_vocabulary():
    torch.manual_seed(1)
    t_logp = F.log_softmax(torch.randn(20, 259), -1)
    s_logp = F.log_softmax(torch.randn(20, 259), -1)
    full = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    t = targets_from_logp(t_logp, 300)
    assert torch.allclose(lumped_kl(t, s_logp), full, rtol=1e-5, atol=1e-6)
    assert float(kl_gap_bound(t, s_logp).abs().max()) == 0.0
    assert torch.equal(t.top1, t_logp.argmax(-1))


# ----------------------------------------------------------------------------- compare with the cache
def _teacher_runs(model):
    """A counter of the teacher's decoder-layer-0 calls (the hook is removed by the caller)."""
    count = {"n": 0}
    layer = model.model.layers[0]
    handle = layer.register_forward_pre_hook(lambda *a: count.__setitem__("n", count["n"] + 1))
    return count, handle


def test_warm_cache_gives_the_cold_rows_without_running_the_teacher(tiny, tmp_path):
    model, tok = tiny
    student = student_of(model, 1)
    exs = examples(10)
    settings = CompareSettings(examples=10, batch_size=3, bootstrap=20, teacher_cache=str(tmp_path / "tc"))
    before = state_checksums(model)
    cold = compare_models(model, {"s": student}, tok, exs, settings)["s"]
    other = student_of(model, 0)          # another student on the same examples
    count, handle = _teacher_runs(model)
    try:
        warm = compare_models(model, {"s": student, "o": other}, tok, exs, settings)
    finally:
        handle.remove()
    assert count["n"] == 0   # the students run their own module trees; the teacher's layers never ran
    assert state_checksums(model) == before
    assert cold.rows() == warm["s"].rows()
    assert list(cold.teacher) == list(warm["o"].teacher)


def test_cached_comparison_matches_the_uncached_one(tiny, tmp_path):
    model, tok = tiny
    student = student_of(model, 1)
    exs = examples(8)
    plain = compare_models(model, {"s": student}, tok, exs, CompareSettings(examples=8, batch_size=2,
                                                                            teacher_cache="off"))["s"]
    exact = compare_models(model, {"s": student}, tok, exs, CompareSettings(examples=8, batch_size=2),
                           cache=TeacherCache(tmp_path / "exact", k=400))["s"]
    lumped = compare_models(model, {"s": student}, tok, exs, CompareSettings(examples=8, batch_size=2),
                            cache=TeacherCache(tmp_path / "k8", k=8))["s"]
    for c in (exact, lumped):
        assert list(c.teacher) == pytest.approx(list(plain.teacher), rel=1e-6)
        assert list(c.student) == pytest.approx(list(plain.student), rel=1e-6)
        assert list(c.agree) == list(plain.agree)
    assert list(exact.kl) == pytest.approx(list(plain.kl), rel=1e-4, abs=1e-7)
    assert all(a <= b + 1e-6 for a, b in zip(lumped.kl, plain.kl))
    assert sum(lumped.kl) < sum(plain.kl)


def test_each_key_part_changed_is_a_miss(tiny, tmp_path):
    model, tok = tiny
    batch = next(iter(data.iter_batches(tok, examples(2), 2, 64)))
    positions = batch["attention_mask"].bool()
    cache = TeacherCache(tmp_path)
    ns = cache.namespace(model, "real", 64)
    t = targets_from_logp(F.log_softmax(torch.randn(int(positions.sum()), 259), -1), cache.k)
    rows = row_keys(batch)
    ns.put(rows[0], type(t)(t.idx[:3], t.logp[:3], t.tail[:3], t.top1[:3]))
    ns.flush()
    assert cache.namespace(model, "real", 64).get(rows[0]) is not None          # the same key: a hit
    other, _ = tiny_model("llama", seed=1)
    misses = [cache.namespace(other, "real", 64),                                 # model fingerprint
              cache.namespace(model.double(), "real", 64),                        # dtype
              cache.namespace(model.float(), "answer", 64),                       # scope
              cache.namespace(model, "real", 65),                                 # max length
              TeacherCache(tmp_path, k=32).namespace(model, "real", 64),         # k
              cache.namespace(model, "real", 64, bf16=True),                      # autocast
              cache.namespace(model, "real", 64, batch_size=4)]                   # batch layout (sum order)
    before = torch.get_num_threads()
    torch.set_num_threads(1 if before > 1 else 2)
    try:
        misses.append(cache.namespace(model, "real", 64))                         # thread count (sum order)
    finally:
        torch.set_num_threads(before)
    for miss in misses:
        assert miss.get(rows[0]) is None
    assert cache.namespace(model, "real", 64).get(rows[1]) is None              # example content
    changed = dict(batch, labels=batch["labels"].clone())
    changed["labels"][0, -1] = 7
    assert row_keys(changed)[0] != rows[0]                                        # the answer's labels


def test_other_format_versions_and_unfinished_shards_are_ignored(tiny, tmp_path):
    model, tok = tiny
    cache = TeacherCache(tmp_path)
    ns = cache.namespace(model, "answer", 64)
    t = targets_from_logp(F.log_softmax(torch.randn(4, 259), -1), cache.k)
    ns.put("a" * 32, t)
    ns.flush()
    assert cache.namespace(model, "answer", 64).get("a" * 32) is not None
    shard = next(ns.folder.glob("shard-*"))
    entries = json.loads((shard / "entries.json").read_text())
    (shard / "entries.json").write_text(json.dumps(dict(entries, format=FORMAT + 1)))
    assert cache.namespace(model, "answer", 64).get("a" * 32) is None
    (shard / "entries.json").write_text(json.dumps(entries))
    (shard / INCOMPLETE).write_text("")
    assert cache.namespace(model, "answer", 64).get("a" * 32) is None
    (shard / INCOMPLETE).unlink()
    assert cache.namespace(model, "answer", 64).get("a" * 32) is not None


def test_a_stopped_comparison_keeps_its_rows_and_shards_bound_memory(tiny, tmp_path, monkeypatch):
    from lowrank_core import teacher_cache
    from lowrank_core.progress import Cancelled

    model, tok = tiny
    monkeypatch.setattr(teacher_cache, "FLUSH_ROWS", 4)
    student = student_of(model, 1)

    def stop(done, total, message):
        if done >= 6:
            raise Cancelled

    settings = CompareSettings(examples=12, batch_size=2, bootstrap=20, teacher_cache=str(tmp_path))
    first = compare_models(model, {"s": student}, tok, examples(12), settings, progress=stop)["s"]
    assert first.stopped and first.examples == 6
    ns = TeacherCache(tmp_path).namespace(model, "answer", settings.max_len, batch_size=settings.batch_size)
    assert len(ns.rows) == 6 and len(list(ns.folder.glob("shard-*"))) == 2   # 4 rows, then the 2 kept at the stop
    (ns.folder / ".shard-0.write-999999999-x").mkdir()                       # a killed writer's leftover
    again = compare_models(model, {"s": student}, tok, examples(12), settings)["s"]
    assert again.examples == 12
    by_key = {r["key"]: r for r in again.rows()}
    assert all(by_key[r["key"]] == r for r in first.rows())   # the kept rows, read back exactly
    assert not (ns.folder / ".shard-0.write-999999999-x").exists()


def test_cache_specs(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    assert resolve_cache("off") is None and resolve_cache(None) is None
    assert CompareSettings().teacher_cache == "auto" and HealSettings().teacher_cache == "off"
    assert resolve_cache("auto").root == tmp_path / "cache" / "teacher"
    assert resolve_cache(str(tmp_path)).root == tmp_path
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="teacher_cache"):
        CompareSettings(teacher_cache=str(tmp_path / "file")).validate()


# ----------------------------------------------------------------------------- healing with the cache
def test_heal_loss_against_the_cache_matches_the_full_kl(tmp_path):
    from lowrank_core.evaluate import logits_at

    model, tok = tiny_model("llama", seed=0)
    student = student_of(model, 1)
    batches = data.calibration_batches(tok, examples(6), 2, 64)
    settings = HealSettings(tokens=100, teacher_cache=str(tmp_path))
    autocast = nullcontext
    exact = cached_targets(model, batches, settings, autocast, cache=TeacherCache(tmp_path / "exact", k=400))
    lumped = cached_targets(model, batches, settings, autocast, cache=TeacherCache(tmp_path / "k16", k=16))
    with torch.no_grad():
        for b, te, tl in zip(batches, exact, lumped):
            full, n = batch_loss(model, student, b, "kl")
            assert n == te.n == tl.n
            assert float(batch_loss(model, student, b, "kl", te)[0]) == pytest.approx(float(full), rel=1e-5)
            lumped = float(batch_loss(model, student, b, "kl", tl)[0])
            s_logp = F.log_softmax(logits_at(student, b, b["attention_mask"].bool()).float(), -1)
            assert lumped <= float(full) + 1e-6
            assert float(full) - lumped <= float(kl_gap_bound(tl, s_logp).sum()) + 1e-6   # the stated tolerance


def test_heal_with_the_cache_reads_the_teacher_once(tmp_path):
    model, tok = tiny_model("llama", seed=0)
    exs = examples(8)
    settings = HealSettings(tokens=200, batch_tokens=64, eval_every=1, patience=2, teacher_cache=str(tmp_path),
                            max_len=64)
    first = student_of(model, 1)
    heal(model, first, tok, exs, settings)
    second, third = student_of(model, 1), student_of(model, 1)   # built before the hook (a copy would keep it)
    count, handle = _teacher_runs(model)
    try:
        result = heal(model, second, tok, exs, settings)
    finally:
        handle.remove()
    assert result.steps >= 1 and count["n"] == 0   # the warm cache: the teacher never ran
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    count, handle = _teacher_runs(model)
    try:
        heal(model, third, tok, exs, dataclasses.replace(settings, teacher_cache="off"))
    finally:
        handle.remove()
    assert count["n"] > 0   # without the cache the teacher runs every step


# ----------------------------------------------------------------------------- shared leading layers
def test_shared_layers_are_found_by_tensor_identity():
    model, _ = tiny_model("llama", seed=0, layers=3)
    assert shared_layers(model, model) == 3
    assert shared_layers(model, student_of(model, 0)) == 0
    assert shared_layers(model, student_of(model, 2)) == 2
    other, _ = tiny_model("llama", seed=0, layers=3)
    assert shared_layers(model, other) is None          # equal values, other tensors: nothing shared
    assert shared_forks(model, {"a": student_of(model, 0), "b": student_of(model, 1)}) == {"b": 1}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_forked_pass_equals_the_unshared_pass(arch):
    from lowrank_core.evaluate import answer_positions, logits_at

    model, tok = tiny_model(arch, seed=0, layers=3)
    student = student_of(model, 2)
    batch = next(iter(data.iter_batches(tok, examples(3), 3, 64)))
    positions = answer_positions(batch)[2]
    with torch.no_grad():
        inputs = decoder_inputs(model, batch)
        mid = run_layers(model, inputs, inputs.hidden[0], 0, 2)
        t = head_logits(model, run_layers(model, inputs, mid, 2, 3), positions)
        s = head_logits(student, run_layers(student, inputs, mid, 2, 3), positions)
        assert torch.allclose(t, logits_at(model, batch, positions), rtol=1e-5, atol=1e-5)
        assert torch.allclose(s, logits_at(student, batch, positions), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(s, t, atol=1e-3)


def test_compare_with_shared_layers_equals_separate_passes(tmp_path):
    from lowrank_core.evaluate import evaluate_models

    model, tok = tiny_model("llama", seed=0, layers=3)
    student = student_of(model, 2)
    exs = examples(6)
    assert shared_forks(model, {"s": student}) == {"s": 2}
    calls = {"teacher": 0, "student": 0}
    handles = [model.model.layers[0].register_forward_pre_hook(lambda *a: calls.__setitem__("teacher", calls["teacher"] + 1)),
               student.model.layers[0].register_forward_pre_hook(lambda *a: calls.__setitem__("student", calls["student"] + 1))]
    try:
        c = compare_models(model, {"s": student}, tok, exs, CompareSettings(examples=6, batch_size=2,
                                                                            teacher_cache="off"))["s"]
    finally:
        for h in handles:
            h.remove()
    assert calls == {"teacher": 3, "student": 0}   # 3 batches: the shared layers ran once, for both
    means = evaluate_models({"t": model, "s": student}, tok, exs, batch_size=1)
    assert c.loss("teacher") == pytest.approx(means["t"].loss, rel=1e-5)
    assert c.loss("student") == pytest.approx(means["s"].loss, rel=1e-5)
