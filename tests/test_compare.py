"""The paired comparison: statistics on synthetic losses, the streaming pass on tiny models, the CLI."""
from __future__ import annotations

import copy
import gc
import json
import math
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowrank_core import data, stats
from lowrank_core.cli import main
from lowrank_core.compare import CompareSettings, compare, compare_models
from lowrank_core.data import Example
from lowrank_core.evaluate import evaluate_models
from lowrank_core.generate import first_difference, side_by_side
from lowrank_core.models import tiny_model
from lowrank_core.progress import Cancelled


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return tiny_model("llama")


def perturbed(model, scale: float, seed: int = 1):
    torch.manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * p.abs().mean() * torch.randn_like(p))
    return out


def examples(n: int) -> list:
    words = "the quick brown fox jumps over a lazy dog while seven zebras quietly eat hay".split()
    return [Example("", " ".join(words[: 2 + i % 9]) + f" {i}?", " ".join(reversed(words[: 3 + (i * 7) % 12])))
            for i in range(n)]


# ----------------------------------------------------------------------------- statistics
def synthetic(rng, n: int, delta: float, noise: float = 0.3):
    """Per-example token counts and Σ diff with a known token-weighted Δ (per-token noise independent of n)."""
    tokens = rng.integers(5, 300, size=n)
    diff = tokens * (delta + noise * rng.standard_normal(n))
    return tokens, diff


def test_bootstrap_interval_covers_the_true_delta_at_about_the_stated_rate():
    rng = np.random.default_rng(0)
    covered = 0
    trials = 300
    for t in range(trials):
        tokens, diff = synthetic(rng, 150, 0.02)
        lo, hi = stats.percentile_interval(stats.bootstrap_ratios(tokens, diff, reps=400, seed=t), 0.95)
        covered += lo <= 0.02 <= hi
    assert 0.91 <= covered / trials <= 0.985, covered / trials


def test_delta_method_se_matches_the_bootstrap_spread():
    rng = np.random.default_rng(1)
    tokens, diff = synthetic(rng, 400, 0.0)
    boot = stats.bootstrap_ratios(tokens, diff, reps=3000, seed=2)
    assert stats.ratio_se(tokens, diff) == pytest.approx(boot.std(), rel=0.1)


def test_running_sums_give_the_same_se_as_the_arrays():
    rng = np.random.default_rng(2)
    tokens, diff = synthetic(rng, 50, 0.01)
    running = stats.RunningRatio()
    for n, d in zip(tokens, diff):
        running.add(float(n), float(d))
    assert running.ratio == pytest.approx(stats.ratio(tokens, diff), rel=1e-12)
    assert running.se() == pytest.approx(stats.ratio_se(tokens, diff), rel=1e-9)


def test_verdicts_follow_the_margin_and_the_sample_size():
    rng = np.random.default_rng(3)
    tokens, diff = synthetic(rng, 2000, 0.0, noise=0.2)
    assert stats.paired_test(tokens, diff, margin=0.02).verdict == "equivalent"
    tokens, diff = synthetic(rng, 2000, 0.2, noise=0.2)
    worse = stats.paired_test(tokens, diff, margin=0.02)
    assert worse.verdict == "not equivalent" and worse.p_value < 1e-6
    tokens, diff = synthetic(rng, 40, 0.0, noise=0.5)
    small = stats.paired_test(tokens, diff, margin=0.02)
    assert small.verdict == "inconclusive" and small.more_examples > 40
    # the estimate of examples needed is about right: that many more examples (same distribution) decide
    tokens, diff = synthetic(rng, 40 + int(1.5 * small.more_examples), 0.0, noise=0.5)
    assert stats.paired_test(tokens, diff, margin=0.02).verdict == "equivalent"


def test_margin_parsing_and_bad_values():
    assert stats.parse_margin("1%", 2.0) == pytest.approx(0.02)
    assert stats.parse_margin("0.05", 2.0) == 0.05
    for bad in ("x", "-1%", "0", "nan"):
        with pytest.raises(ValueError, match="margin"):
            stats.parse_margin(bad, 2.0)
    with pytest.raises(ValueError, match="level"):
        CompareSettings(level=1.5).validate()


# ----------------------------------------------------------------------------- the streaming pass
def test_identical_student_is_equivalent_with_zero_kl(tiny):
    model, tok = tiny
    c = compare(model, model, tok, examples(40), CompareSettings(examples=40, batch_size=4))
    s = c.summary()
    assert s["verdict"] == "equivalent" and s["delta"] == 0 and s["delta_ci"] == [0.0, 0.0]
    assert s["kl"] == pytest.approx(0.0, abs=1e-7) and s["top1_agreement"] == 1.0
    assert s["examples"] == 40 and s["teacher_loss"] == s["student_loss"]


def test_clearly_worse_student_is_not_equivalent(tiny):
    model, tok = tiny
    worse = perturbed(model, 2.0)
    s = compare(model, worse, tok, examples(60), CompareSettings(examples=60, batch_size=4)).summary()
    assert s["verdict"] == "not equivalent" and s["delta"] > s["margin"]
    assert s["delta_ci"][0] > 0 and s["kl"] > 0.01 and s["top1_agreement"] < 1.0
    assert "worse" in s["verdict_text"]
    assert len(s["worst"]) == 10 and s["worst"][0]["delta"] >= s["worst"][-1]["delta"]


def test_means_match_evaluation_and_per_example_sums_match_a_manual_pass(tiny):
    model, tok = tiny
    student = perturbed(model, 0.2)
    exs = examples(12)
    c = compare(model, student, tok, exs, CompareSettings(examples=12, batch_size=5, bootstrap=50, teacher_cache="off"))
    means = evaluate_models({"teacher": model, "student": student}, tok, exs, batch_size=1)
    assert c.loss("teacher") == pytest.approx(means["teacher"].loss, rel=1e-5)
    assert c.loss("student") == pytest.approx(means["student"].loss, rel=1e-5)
    assert c.eval_result("student").tokens == means["student"].tokens
    by_key = {r["key"]: r for r in c.rows()}
    ex = exs[3]
    enc = data.encode_example(tok, ex, 512)
    ids = torch.tensor([enc.input_ids])
    labels = torch.tensor(enc.labels[1:])
    keep = labels != data.IGNORE_INDEX
    with torch.no_grad():
        t_logp = F.log_softmax(model(input_ids=ids).logits[0, :-1][keep], -1)
        s_logp = F.log_softmax(student(input_ids=ids).logits[0, :-1][keep], -1)
    row = by_key[ex.key()]
    assert row["tokens"] == int(keep.sum())
    assert row["teacher_sum"] == pytest.approx(float(-t_logp.gather(1, labels[keep][:, None]).sum()), rel=1e-4)
    assert row["student_sum"] == pytest.approx(float(-s_logp.gather(1, labels[keep][:, None]).sum()), rel=1e-4)
    kl = float((t_logp.exp() * (t_logp - s_logp)).sum())
    assert row["kl"] * row["tokens"] == pytest.approx(kl, rel=1e-3, abs=1e-6)


def test_memory_does_not_grow_with_the_number_of_examples(tiny):
    """Live tensors stay constant from batch to batch, and the Python heap grows by a few hundred bytes
    per example (its scalars), not by per-token data."""
    model, tok = tiny
    student = perturbed(model, 0.1)

    def tensors_alive() -> int:
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    counts, heap = [], []

    def progress(done, total, message):
        counts.append(tensors_alive())
        heap.append(tracemalloc.get_traced_memory()[0])

    tracemalloc.start()
    try:
        compare(model, student, tok, (ex for ex in examples(200)),
                CompareSettings(examples=200, batch_size=4, bootstrap=20, teacher_cache="off"), progress=progress)
    finally:
        tracemalloc.stop()
    assert len(counts) == 50
    assert max(counts[5:]) == min(counts[5:])
    per_example = (heap[-1] - heap[4]) / (4 * (len(heap) - 5))
    assert per_example < 1500, per_example


def test_a_stop_keeps_what_was_scored(tiny):
    model, tok = tiny

    def progress(done, total, message):
        if done >= 8:
            raise Cancelled

    c = compare(model, perturbed(model, 0.1), tok, examples(40), CompareSettings(examples=40, batch_size=4),
                progress=progress)
    s = c.summary()
    assert c.stopped and s["stopped"] and s["examples"] == 8


def test_several_students_share_the_teacher_pass(tiny):
    model, tok = tiny
    a, b = perturbed(model, 0.1, seed=2), perturbed(model, 0.5, seed=3)
    both = compare_models(model, {"a": a, "b": b}, tok, examples(16), CompareSettings(examples=16, batch_size=4))
    alone = compare(model, b, tok, examples(16), CompareSettings(examples=16, batch_size=4))
    assert both["b"].summary()["delta"] == pytest.approx(alone.summary()["delta"], rel=1e-9)
    assert both["a"].summary()["delta"] < both["b"].summary()["delta"]
    with pytest.raises(ValueError, match="teacher"):
        compare_models(model, {"teacher": a}, tok, examples(4))


def test_interval_narrows_as_examples_accumulate(tiny):
    model, tok = tiny
    c = compare(model, perturbed(model, 0.3), tok, examples(120), CompareSettings(examples=120, batch_size=4))
    path = c.interval_path(points=6)
    assert path[-1]["examples"] == 120 and path[0]["examples"] == stats.MIN_INTERVAL_N
    widths = [r["hi"] - r["lo"] for r in path]
    assert widths[-1] < widths[0]


# ----------------------------------------------------------------------------- answers side by side
def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_side_by_side_marks_where_the_student_leaves_the_teacher(tiny):
    model, tok = tiny
    state = torch.random.get_rng_state()
    same = side_by_side(model, model, tok, examples(2), k=2, max_new_tokens=6)
    assert [r.mode for r in same] == ["greedy", "sampled", "greedy", "sampled"]
    assert all(r.diverge is None and r.teacher == r.student and r.teacher_rest == "" for r in same)
    assert torch.equal(torch.random.get_rng_state(), state)  # sampling leaves the global RNG alone
    other = side_by_side(model, perturbed(model, 3.0), tok, examples(3), k=3, max_new_tokens=6, modes=("greedy",))
    assert any(r.diverge is not None for r in other)
    for r in other:
        if r.diverge is not None:
            assert r.common + r.teacher_rest == r.teacher or r.diverge < r.teacher_tokens
    with pytest.raises(ValueError, match="modes"):
        side_by_side(model, model, tok, examples(1), modes=("beam",))


# ----------------------------------------------------------------------------- CLI
def test_cli_compares_a_plan_student_and_writes_per_example_rows(tmp_path, capsys):
    rows = tmp_path / "rows.csv"
    rc = main(["compare", "--teacher", "tiny", "--student", "all:k0.5", "--data", "chatterbot", "--calib", "8",
               "--n", "24", "--max-len", "64", "--eval-max-len", "64", "--bootstrap", "200",
               "--per-example", str(rows), "--generate", "1", "--max-new-tokens", "4", "--json"])
    assert rc == 0
    record = json.loads(capsys.readouterr().out)
    (s,) = record["students"]
    assert s["student"] == "all:k0.5" and s["examples"] == 24 and s["verdict"] in stats.VERDICTS
    assert s["params"] < s["teacher_params"] and (s["delta_ci"] is None) == (s["examples"] < stats.MIN_INTERVAL_N)
    assert math.isclose(s["delta"], s["student_loss"] - s["teacher_loss"], rel_tol=1e-9, abs_tol=1e-12)
    assert len(rows.read_text().splitlines()) == 25
    assert [g["mode"] for g in record["generations"]["all:k0.5"]] == ["greedy", "sampled"]


def test_cli_refuses_bad_input_before_loading_anything(tmp_path, capsys):
    assert main(["compare", "--teacher", "tiny", "--student", "all:k1.7", "--data", "chatterbot"]) == 2
    assert "keep 1.7 is outside (0, 1]" in capsys.readouterr().err
    assert main(["compare", "--teacher", "tiny", "--student", "all:k0.5", "--margin", "lots"]) == 2
    assert "margin" in capsys.readouterr().err
    assert main(["compare", "--teacher", "tiny", "--student", "all:k0.5",
                 "--per-example", str(tmp_path / "missing" / "rows.csv")]) == 2
    assert "--per-example" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["compare", "--teacher", "tiny", "--student", str(tmp_path / "empty")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_cli_compares_an_export_folder_like_the_job_that_wrote_it(tmp_path, capsys):
    folder = tmp_path / "student"
    common = ["--data", "chatterbot", "--calib", "8", "--max-len", "64"]
    assert main(["compress", "--model", "tiny", "--plan", "mlp:r8", *common, "--eval", "12", "--export", str(folder),
                 "--format", "factorized", "--json"]) == 0
    job = json.loads(capsys.readouterr().out)["comparison"]
    assert main(["compare", "--teacher", "tiny", "--student", str(folder), *common, "--n", "12",
                 "--eval-max-len", "64", "--json"]) == 0
    (s,) = json.loads(capsys.readouterr().out)["students"]
    assert s["examples"] == job["examples"] == 12 and s["fingerprint"] == job["fingerprint"]
    assert s["delta"] == pytest.approx(job["delta"], abs=1e-6) and s["verdict"] == job["verdict"]
    card = (folder / "README.md").read_text()
    assert job["verdict_text"] in card


# ----------------------------------------------------------------------------- stopping when decided
def test_until_decided_stops_at_the_first_deciding_look_as_a_normal_end(tiny):
    model, tok = tiny
    events = []

    def progress(done, total, message, stage="", metrics=None):
        events.append((done, dict(metrics or {})))

    settings = CompareSettings(examples=60, batch_size=5, until_decided=True)
    c = compare(model, model, tok, examples(60), settings, progress=progress)
    s = c.summary()
    seq = s["sequential"]
    assert seq["looks"] == [36, 48, 60] and s["procedure"] == stats.PROCEDURE  # none before MIN_INTERVAL_N = 30
    assert s["decided"] and s["verdict"] == "equivalent" and s["stopping_n"] == 36 == seq["stopping_n"]
    assert c.examples == 36 and not c.stopped and not s["stopped"]  # the last batch's 37th-40th examples dropped
    assert "decided after 36 examples (look 1 of 3)" in s["verdict_text"]
    assert events[-1][0] == 40  # scoring ended at the batch holding the deciding look (examples 36-40)
    assert all("equivalent_within" in m for done, m in events if 2 <= done < 24)  # the live boundary
    assert not [m for done, m in events if done < stats.MIN_INTERVAL_N and math.isfinite(m.get("half_width", 1))]


def test_until_decided_not_equivalent_and_undecided_at_the_maximum(tiny):
    model, tok = tiny
    s = compare(model, perturbed(model, 2.0), tok, examples(60),
                CompareSettings(examples=60, batch_size=4, until_decided=True)).summary()
    assert s["decided"] and s["verdict"] == "not equivalent" and s["stopping_n"] < 60
    student = perturbed(model, 0.05)
    delta = compare(model, student, tok, examples(30), CompareSettings(examples=30, batch_size=4)).summary()["delta"]
    close = compare(model, student, tok, examples(30),  # Δ sits on the margin: no look can decide
                    CompareSettings(examples=30, batch_size=4, until_decided=True, margin=repr(abs(delta)))).summary()
    assert not close["decided"] and close["verdict"] == "inconclusive" and close["stopping_n"] == 30
    assert "undecided at the maximum of 30 examples" in close["verdict_text"]
    fixed = compare(model, model, tok, examples(30), CompareSettings(examples=30, batch_size=4)).summary()
    assert fixed["sequential"] is None and fixed["stopping_n"] == 30 and fixed["procedure"].startswith("fixed-N")


def test_small_n_comparison_shows_no_interval_and_no_verdict(tiny):
    model, tok = tiny
    s = compare(model, perturbed(model, 2.0), tok, examples(7), CompareSettings(examples=7, batch_size=4)).summary()
    assert s["delta_ci"] is None and s["p_value"] is None and s["verdict"] == "inconclusive"
    assert s["interval_note"].startswith(f"interval shown from N ≥ {stats.MIN_INTERVAL_N}")
    assert f"No verdict below N = {stats.MIN_INTERVAL_N}" in s["verdict_text"]


def test_cli_until_decided_reports_the_stopping_n(tmp_path, capsys):
    rc = main(["compare", "--teacher", "tiny", "--student", "all:k0.5", "--data", "chatterbot", "--calib", "8",
               "--until-decided", "--max-n", "40", "--looks", "2", "--max-len", "64", "--eval-max-len", "64",
               "--json"])
    assert rc == 0
    (s,) = json.loads(capsys.readouterr().out)["students"]
    assert s["procedure"] == stats.PROCEDURE and s["sequential"]["looks"] == [40]  # none before N = 30
    assert s["stopping_n"] == 40 and isinstance(s["decided"], bool) and s["examples"] == s["stopping_n"]
    rc = main(["compare", "--teacher", "tiny", "--student", "all:k0.5", "--data", "chatterbot", "--calib", "8",
               "--until-decided", "--max-n", "40", "--looks", "2", "--max-len", "64", "--eval-max-len", "64"])
    out = capsys.readouterr().out
    assert rc == 0 and f"procedure: {stats.PROCEDURE}; " in out
    assert ("decided after" in out) or ("undecided at the maximum" in out)
