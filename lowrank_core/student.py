"""Students: new module trees that replace some linears and share every other tensor with the teacher.

``build_student`` deep-copies only the module *objects*: a ``copy.deepcopy`` memo pre-filled with every
parameter and buffer of the teacher (``id -> the same tensor``) makes the copy reuse them, and with each
replaced submodule (``id -> its replacement``) puts the replacements straight into the new tree. So no
weight is duplicated (a 7B teacher costs nothing extra), tied weights stay tied, and the teacher is
never touched.
"""
from __future__ import annotations

import copy
import hashlib
from typing import Mapping

import torch
from torch import nn

from .decompose import Factors
from .lowrank import LowRankLinear
from .sliced import assemble_parts


class StudentError(ValueError):
    """A replacement that does not fit the teacher (unknown module name, wrong shape)."""


def _check_replacement(teacher: nn.Module, name: str, module: nn.Module) -> nn.Module:
    try:
        original = teacher.get_submodule(name)
    except AttributeError:
        raise StudentError(f"the teacher has no submodule named {name!r}; use full paths such as "
                           f"'model.layers.0.mlp.down_proj'") from None
    if original is teacher:
        raise StudentError("the whole model cannot be replaced; name a submodule")
    if not isinstance(module, nn.Module):
        raise StudentError(f"replacement for {name!r} must be an nn.Module, got {type(module).__name__}")
    for attr in ("in_features", "out_features"):
        a, b = getattr(original, attr, None), getattr(module, attr, None)
        if a is not None and b is not None and a != b:
            raise StudentError(f"replacement for {name!r} has {attr}={b}, the teacher's module has {a}")
    return original


def build_student(teacher: nn.Module, replacements: Mapping[str, nn.Module]) -> nn.Module:
    """A new model equal to ``teacher`` except that ``replacements[name]`` stands at each ``name``.

    Every untouched parameter and buffer is the *same tensor object* as the teacher's (no copy); the
    teacher and its tensors are not modified. Replacement modules are used as given (not copied); parts of a
    fused linear (``<fused>.<part>``, marked by ``sliced.mark_part``) are gathered into a ``SlicedLinear``.
    """
    replacements = assemble_parts(teacher, replacements)
    memo: dict[int, object] = {}
    for t in list(teacher.parameters()) + list(teacher.buffers()):
        memo[id(t)] = t
    for name, module in replacements.items():
        memo[id(_check_replacement(teacher, name, module))] = module
    return copy.deepcopy(teacher, memo)


def private_view(model: nn.Module) -> nn.Module:
    """A new module tree sharing every tensor of ``model``: hooks put on it are seen by no other caller of
    ``model`` (another session may be running the same teacher), and it costs no weight memory."""
    return build_student(model, {})


def low_rank_student(teacher: nn.Module, factors: Mapping[str, Factors], dtype=None) -> nn.Module:
    """``build_student`` with a ``LowRankLinear`` made from each entry of ``factors`` ({name: Factors})."""
    return build_student(teacher, {name: LowRankLinear.from_factors(f, dtype=dtype) for name, f in factors.items()})


# ----------------------------------------------------------------------------- teacher checks
def state_checksums(model: nn.Module) -> dict[str, str]:
    """``{name: blake2b of the raw bytes}`` for every parameter and buffer: a bit-exact snapshot."""
    out: dict[str, str] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        h = hashlib.blake2b(raw.tobytes(), digest_size=16)
        h.update(f"{tuple(t.shape)}:{t.dtype}:{t.requires_grad}".encode())
        out[name] = h.hexdigest()
    return out


def changed_tensors(model: nn.Module, snapshot: Mapping[str, str]) -> list[str]:
    """Names whose bytes, shape or dtype differ from ``snapshot`` (plus names added or removed)."""
    now = state_checksums(model)
    return sorted(n for n in set(now) | set(snapshot) if now.get(n) != snapshot.get(n))


def shared_tensor_names(teacher: nn.Module, student: nn.Module) -> list[str]:
    """Names of the student's parameters/buffers that are the very tensors of the teacher (same storage)."""
    ptrs = {t.data_ptr() for t in list(teacher.parameters()) + list(teacher.buffers()) if t.numel()}
    named = list(student.named_parameters(remove_duplicate=False)) + list(student.named_buffers(remove_duplicate=False))
    return [n for n, t in named if t.numel() and t.data_ptr() in ptrs]

