"""Fused linears factorised by parts: ``SlicedLinear`` and the marks that say which rows a part computes.

Phi-3's ``qkv_proj`` is one ``nn.Linear`` whose output rows are ``[q; k; v]``. A plan may give the parts their
own ranks: each part's replacement (a ``LowRankLinear``) is *marked* with its short name and the fused
layout ``((short, start, stop), ...)`` (:func:`mark_part`) and stands in the replacements under
``<fused path>.<short>``; :func:`assemble_parts` turns those into one ``SlicedLinear`` at the fused path,
the parts no rule named left as dense row views of the teacher's weight (bit-identical, no copy).
``SlicedLinear`` computes ``y = [part_1(x), ..., part_n(x)]`` (concatenated on the last dim).
"""
from __future__ import annotations

import copy
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

PART_ATTR = "lowrank_part"   # (short, layout) on a marked part replacement


class SlicedLinear(nn.Module):
    """``in -> sum(rows)``: children named by the parts' short names, outputs concatenated in layout order."""

    def __init__(self, parts: Mapping[str, nn.Module]):
        super().__init__()
        self.part_names = tuple(parts)
        for short, module in parts.items():
            self.add_module(short, module)
        first = next(iter(parts.values()))
        self.in_features = int(first.in_features)
        self.out_features = sum(int(m.out_features) for m in parts.values())

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([getattr(self, short)(x) for short in self.part_names], dim=-1)

    def layout(self) -> list[list]:
        """``[[short, rows], ...]``: what a factorized export records to rebuild this module from its config."""
        return [[short, int(getattr(self, short).out_features)] for short in self.part_names]


def mark_part(module: nn.Module, short: str, layout: tuple) -> nn.Module:
    """``module`` marked as part ``short`` of a fused linear with ``layout`` ``((short, start, stop), ...)``."""
    setattr(module, PART_ATTR, (short, tuple(tuple(p) for p in layout)))
    return module


def part_rows(module: nn.Module) -> Optional[tuple[int, int]]:
    """(start, stop) output rows of a marked part in its fused linear, None for an unmarked module."""
    mark = getattr(module, PART_ATTR, None)
    if mark is None:
        return None
    short, layout = mark
    return next((start, stop) for name, start, stop in layout if name == short)


def fused_path(rel: str, module: nn.Module) -> str:
    """The path of the module that computes ``module``'s matrix in the teacher (its fused linear for a part)."""
    return rel.rpartition(".")[0] if part_rows(module) is not None else rel


def teacher_weight(root: nn.Module, rel: str, module: nn.Module) -> Tensor:
    """The teacher weight [out, in] that ``module`` (the replacement at ``rel`` in ``root``) stands for."""
    weight = root.get_submodule(fused_path(rel, module)).weight.detach()
    rows = part_rows(module)
    return weight if rows is None else weight[rows[0]:rows[1]]


def dense_slice(linear: nn.Linear, start: int, stop: int) -> nn.Linear:
    """An ``nn.Linear`` whose weight (and bias) are row views ``[start:stop]`` of ``linear``'s: no copy."""
    weight = linear.weight
    part = nn.Linear(linear.in_features, stop - start, bias=linear.bias is not None, device="meta")
    part.weight = nn.Parameter(weight.detach()[start:stop], requires_grad=weight.requires_grad)
    if linear.bias is not None:
        part.bias = nn.Parameter(linear.bias.detach()[start:stop], requires_grad=linear.bias.requires_grad)
    return part


def assemble_parts(root: nn.Module, replacements: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """``replacements`` with the marked parts of each fused linear gathered into one ``SlicedLinear`` at the
    fused path (unnamed parts: :func:`dense_slice` of the teacher's rows); other entries unchanged."""
    out: dict[str, nn.Module] = {}
    groups: dict[str, dict[str, nn.Module]] = {}
    layouts: dict[str, tuple] = {}
    for name, module in replacements.items():
        mark = getattr(module, PART_ATTR, None)
        if mark is None:
            out[name] = module
            continue
        parent = name.rpartition(".")[0]
        groups.setdefault(parent, {})[mark[0]] = module
        layouts[parent] = mark[1]
    for parent, parts in groups.items():
        fused = root.get_submodule(parent)   # the teacher's linear, or a student's SlicedLinear (heal's copy)
        out[parent] = SlicedLinear({short: parts.get(short) or _kept_part(fused, short, start, stop)
                                    for short, start, stop in layouts[parent]})
    return out


def _kept_part(fused: nn.Module, short: str, start: int, stop: int) -> nn.Module:
    """A part no replacement names: the teacher's rows, or a ``SlicedLinear``'s own part (a new module object
    sharing its tensors)."""
    if not isinstance(fused, SlicedLinear):
        return dense_slice(fused, start, stop)
    part = getattr(fused, short)
    return copy.deepcopy(part, {id(t): t for t in list(part.parameters()) + list(part.buffers())})


def sliced_modules(model: nn.Module) -> dict[str, SlicedLinear]:
    """{name: module} of every ``SlicedLinear`` in ``model`` (also the factorized export's own class)."""
    return {name: m for name, m in model.named_modules() if callable(getattr(m, "layout", None))
            and isinstance(getattr(m, "part_names", None), tuple)}
