"""Students share untouched tensors with the teacher and never modify it."""
import pytest
import torch

from lowrank_core.linears import linear_map
from lowrank_core.decompose import svd_factors
from lowrank_core.lowrank import LowRankLinear
from lowrank_core.student import (StudentError, build_student, changed_tensors, low_rank_student, shared_tensor_names,
                                  state_checksums)


def _ids():
    return torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(0))


def test_teacher_is_bit_identical_and_tensors_are_shared(tiny_any):
    model, _ = tiny_any
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits.clone()
    snapshot = state_checksums(model)
    names = [i.name for i in linear_map(model) if i.module in ("q_proj", "down_proj")]
    factors = {n: svd_factors(model.get_submodule(n).weight, 4) for n in names}
    student = low_rank_student(model, factors)
    with torch.no_grad():
        out = student(ids).logits
        after = model(ids).logits
    assert changed_tensors(model, snapshot) == []
    assert torch.equal(before, after)
    assert not torch.allclose(out, before)  # the student really is different
    for n in names:
        assert isinstance(student.get_submodule(n), LowRankLinear)
        assert isinstance(model.get_submodule(n), torch.nn.Linear)
    # every untouched tensor is the teacher's very storage
    shared = set(shared_tensor_names(model, student))
    student_names = {n for n, _ in student.named_parameters(remove_duplicate=False)}
    untouched = {n for n in student_names if not any(n.startswith(r + ".") for r in names)}
    assert untouched <= shared and not (student_names - untouched) & shared
    t_params = dict(model.named_parameters())
    s_params = dict(student.named_parameters())
    assert s_params["model.embed_tokens.weight"] is t_params["model.embed_tokens.weight"]


def test_tied_head_stays_tied_and_no_replacement_is_identical(tiny):
    model, _ = tiny
    student = build_student(model, {})
    assert student is not model
    assert student.lm_head.weight is student.model.embed_tokens.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(student(_ids()).logits, model(_ids()).logits)


def test_replacing_the_student_leaves_the_teacher_alone(tiny):
    model, _ = tiny
    snapshot = state_checksums(model)
    name = "model.layers.1.mlp.up_proj"
    student = low_rank_student(model, {name: svd_factors(model.get_submodule(name).weight, 8)})
    with torch.no_grad():
        student.get_submodule(name).up.weight.add_(1.0)
    assert changed_tensors(model, snapshot) == []
    with torch.no_grad():  # changing a shared tensor through the student shows up: the check works
        student.model.norm.weight.add_(1.0)
    assert changed_tensors(model, snapshot) == ["model.norm.weight"]


def test_bad_replacements_raise(tiny):
    model, _ = tiny
    with pytest.raises(StudentError, match="model.layers.9.mlp.up_proj"):
        build_student(model, {"model.layers.9.mlp.up_proj": torch.nn.Identity()})
    with pytest.raises(ValueError, match="in_features"):
        build_student(model, {"model.layers.0.mlp.up_proj": LowRankLinear(10, 128, 2)})
