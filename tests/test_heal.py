"""Healing: end-to-end distillation lowers the held-out KL to the teacher, trains only the student's own
tensors (the teacher stays bit-identical), resumes from a checkpoint exactly, and plugs into the job."""
from __future__ import annotations

import json

import pytest
import torch

from lowrank_core.cli import main
from lowrank_core.compress import CompressSettings, compress
from lowrank_core.data import calibration_batches, make_split
from lowrank_core.heal import HealSettings, batch_loss, copy_student, heal, mean_loss
from lowrank_core.models import tiny_model
from lowrank_core.options import parse_count
from lowrank_core.progress import ProgressEvent
from lowrank_core.recipe import RecipeError, validate_recipe
from lowrank_core.student import changed_tensors, shared_tensor_names, state_checksums

MAX_LEN = 64


@pytest.fixture(scope="module")
def split():
    return make_split("chatterbot", n_calib=24, n_eval=8, seed=0)


@pytest.fixture(scope="module")
def compressed(split):
    teacher, tok = tiny_model("llama", seed=0)
    result = compress(teacher, tok, "all:k0.3", split.calib, CompressSettings(calib=24, max_len=MAX_LEN))
    return teacher, tok, result.student


def _kl(teacher, student, tok, examples) -> float:
    """Mean per-token KL(teacher ‖ student) on ``examples``, measured independently of heal's own loop."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for b in calibration_batches(tok, examples, 4, MAX_LEN):
            mask = b["attention_mask"].bool()
            t = torch.log_softmax(teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, -1)
            s = torch.log_softmax(student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, -1)
            total += float((t.exp() * (t - s)).sum(-1)[mask].sum())
            tokens += int(mask.sum())
    return total / tokens


def test_healing_lowers_held_out_kl_and_leaves_the_teacher_untouched(compressed, split):
    teacher, tok, student = compressed
    student = copy_student(student)
    snapshot = state_checksums(teacher)
    shared_before = set(shared_tensor_names(teacher, student))
    before = _kl(teacher, student, tok, split.eval)  # evaluation side: never trained on
    result = heal(teacher, student, tok, split.calib, HealSettings(tokens=6000, lr=3e-3, batch_tokens=256,
                                                                    max_len=MAX_LEN, valid_fraction=0.25, patience=50))
    after = _kl(teacher, student, tok, split.eval)
    assert after < 0.9 * before, (before, after)
    assert result.best_valid < result.initial_valid and result.tokens >= 6000 and result.steps > 5
    assert result.train_examples == 18 and result.valid_examples == 6
    assert len(result.curve["train"]) == result.steps and result.curve["eval_steps"][0] == 0
    assert changed_tensors(teacher, snapshot) == []
    assert all(p.grad is None for p in list(teacher.parameters()) + list(student.parameters()))
    assert not any(p.requires_grad for n, p in student.named_parameters() if ".down." in n or ".up." in n)
    assert set(shared_tensor_names(teacher, student)) == shared_before  # embeddings, norms: still the teacher's


def test_copy_student_keeps_the_original_student(compressed, split):
    teacher, tok, student = compressed
    before = {k: v.clone() for k, v in student.state_dict().items()}
    healed = copy_student(student)
    result = heal(teacher, healed, tok, split.calib, HealSettings(tokens=3000, lr=3e-3, batch_tokens=256,
                                                                  max_len=MAX_LEN, patience=50))
    assert result.best_step > 0  # the factors kept are trained ones
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in healed.state_dict().items())


def test_train_norms_copies_them_first(compressed, split):
    teacher, tok, student = compressed
    student = copy_student(student)
    snapshot = state_checksums(teacher)
    result = heal(teacher, student, tok, split.calib, HealSettings(tokens=3000, lr=3e-3, batch_tokens=256,
                                                                   max_len=MAX_LEN, train_norms=True, patience=50))
    assert result.best_step > 0
    assert changed_tensors(teacher, snapshot) == []
    assert not any("norm" in n for n in shared_tensor_names(teacher, student))
    norms = [n for n, _ in student.named_parameters() if "norm" in n]
    assert norms and any(not torch.equal(student.get_parameter(n), teacher.get_parameter(n)) for n in norms)


def test_answer_cross_entropy_option(compressed, split):
    teacher, tok, student = compressed
    student = copy_student(student)
    settings = HealSettings(tokens=3000, lr=3e-3, batch_tokens=256, max_len=MAX_LEN, loss="ce", patience=50)
    result = heal(teacher, student, tok, split.calib, settings)
    assert result.best_valid < result.initial_valid
    b = calibration_batches(tok, split.calib[:2], 2, MAX_LEN)[0]
    value, n = batch_loss(teacher, student, b, "ce")
    assert n == int((b["labels"][:, 1:] != -100).sum()) and value.item() > 0


def test_checkpoint_resume_continues_the_same_run(compressed, split, tmp_path):
    teacher, tok, student = compressed
    common = dict(lr=3e-3, batch_tokens=256, max_len=MAX_LEN, eval_every=1, patience=100)
    straight = copy_student(student)
    heal(teacher, straight, tok, split.calib, HealSettings(tokens=3000, **common))
    resumed = copy_student(student)
    first = heal(teacher, resumed, tok, split.calib, HealSettings(tokens=1500, checkpoint=str(tmp_path), **common))
    second = heal(teacher, resumed, tok, split.calib, HealSettings(tokens=3000, checkpoint=str(tmp_path), **common))
    assert second.resumed_from == first.steps > 0 and second.steps > first.steps
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert json.loads((tmp_path / "heal.json").read_text())["step"] == second.steps


def test_gradient_checkpointing_trains_the_same_factors(compressed, split):
    teacher, tok, student = compressed
    common = dict(tokens=800, lr=3e-3, batch_tokens=256, max_len=MAX_LEN, eval_every=1, patience=100)
    plain, checkpointed = copy_student(student), copy_student(student)
    heal(teacher, plain, tok, split.calib, HealSettings(**common))
    heal(teacher, checkpointed, tok, split.calib, HealSettings(checkpointing=True, **common))
    a, b = plain.state_dict(), checkpointed.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not checkpointed.training and not teacher.training
    assert not getattr(teacher.model, "gradient_checkpointing", False)


def test_settings_are_checked_and_counts_parse():
    assert parse_count("2M") == 2_000_000 and parse_count("500k") == 500_000 and parse_count("1200") == 1200
    with pytest.raises(ValueError, match="'lots' is not a count"):
        parse_count("lots")
    with pytest.raises(ValueError, match="unknown healing loss 'mse'"):
        HealSettings(tokens=10, loss="mse").validate()
    spec = validate_recipe({"plan": "mlp:r8", "heal": {"tokens": "200k", "lr": 1e-3}})
    assert spec.heal.tokens == 200_000 and spec.heal.enabled and spec.heal.lr == 1e-3
    with pytest.raises(RecipeError, match="heal.tokens: 'lots' is not a count"):
        validate_recipe({"plan": "mlp:r8", "heal": {"tokens": "lots"}})
    with pytest.raises(RecipeError, match=r"heal: healing valid_fraction 1.5 must be in \[0, 1\)"):
        validate_recipe({"plan": "mlp:r8", "heal": {"tokens": 10, "valid_fraction": 1.5}})


def test_compress_heals_as_a_stage_of_the_job(capsys):
    argv = ["compress", "--model", "tiny", "--data", "chatterbot", "--plan", "all:k0.3", "--calib", "12",
            "--eval", "4", "--max-len", "64", "--heal-tokens", "1.5k", "--heal-lr", "3e-3", "--heal-batch-tokens",
            "256", "--heal-max-len", "64", "--heal-patience", "100", "--json"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["heal"]["tokens"] >= 1500 and record["heal"]["best_valid"] <= record["heal"]["initial_valid"]
    assert record["job"]["heal"]["tokens"] == 1500 and "heal" in record["seconds"]
    assert main(argv[:-1]) == 0
    assert "healing: " in capsys.readouterr().out


def test_mean_loss_of_the_teacher_against_itself_is_zero(compressed, split):
    teacher, tok, _ = compressed
    batches = calibration_batches(tok, split.calib[:4], 2, MAX_LEN)
    assert mean_loss(teacher, teacher, batches, "kl", lambda: torch.no_grad()) == pytest.approx(0.0, abs=1e-6)


def test_progress_reports_carry_the_live_curve_as_typed_metrics(compressed, split):
    teacher, tok, student = compressed
    events = []

    def record(done, total, message="", *, stage="", metrics=None):
        events.append(ProgressEvent(stage, done, total, message, dict(metrics or {})))

    result = heal(teacher, copy_student(student), tok, split.calib[:12],
                  HealSettings(tokens=700, batch_tokens=128, max_len=MAX_LEN, eval_every=2, patience=50),
                  progress=record)
    curve = result.curve
    assert result.steps >= 3 and [e.stage for e in events] == ["heal"] * result.steps
    assert [e.metrics["train_loss"] for e in events] == curve["train"]  # the step's own loss, not a rounded text
    last_check = [max(j for j, at in enumerate(curve["eval_steps"]) if at <= step)
                  for step in range(1, result.steps + 1)]
    assert [e.metrics["valid_loss"] for e in events] == [curve["valid"][j] for j in last_check]
    assert [e.done for e in events] == sorted({e.done for e in events}) and events[-1].done == min(result.tokens, 700)
    assert all(e.total == 700 for e in events)
