"""The method interface and its registry: a method turns one dense linear into rank-r factors.

A method is a subclass of :class:`Method` in its own file of this package, decorated with
:func:`register`. What it declares decides the pipeline (``compress.py``), like llm-compressor's
modifiers choose their pipeline:

- ``needs_grams``: ``factorize`` reads the input Gram of the matrix (calibration runs first);
- ``output_covariance``: for an ``out <= in`` matrix ``factorize`` also accepts the output covariance
  ``Σ y yᵀ`` (``decompose.OutputCovariance``) in place of the input Gram: the fast pipeline then
  measures that instead where it is cheaper (``calibrate.cheaper_as_outputs``: down_proj);
- ``sequential``: the method must see the *student's* stream, so compression runs decoder layer by
  layer (``refine_layer`` is then called for each layer after its closed-form factors are built).

The registry feeds plan validation, the CLI's ``--method`` choices, the recipe schema and the app's
selectbox; nothing else lists method names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from ..decompose import Factors
from ..layerwise import LayerInputs
from ..progress import Progress


class MethodError(ValueError):
    """An unknown method name; the message lists the registered ones."""


@dataclass
class LayerContext:
    """One decoder layer during sequential compression, handed to ``Method.refine_layer``.

    ``layer``: the teacher layer on the compute ``device`` (never modified); ``factors``: {path in the
    layer: LowRankLinear} built by ``factorize`` (refined in place); ``student_in`` / ``teacher_in``:
    the student's and the teacher's hidden streams entering the layer, ``teacher_out`` the teacher
    layer's outputs (per batch ``[B, T, H]``); ``fit`` / ``held_out``: batch indices; ``settings``: the
    ``CompressSettings`` of the run.
    """

    layer: nn.Module
    index: int
    factors: dict
    inputs: LayerInputs
    teacher_in: list
    student_in: list
    teacher_out: list
    fit: list
    held_out: list
    settings: object
    device: torch.device


class Method:
    """Base class of a compression method (see the module docstring)."""

    name: ClassVar[str]
    summary: ClassVar[str]            # one line for CLI help and the app
    order: ClassVar[int] = 100        # position in choices (lower first)
    needs_grams: ClassVar[bool] = False
    output_covariance: ClassVar[bool] = False
    sequential: ClassVar[bool] = False

    def factorize(self, weight: torch.Tensor, rank: int, gram=None, bias: Optional[torch.Tensor] = None) -> Factors:
        """Closed-form factors of ``weight [out, in]`` at ``rank``; ``gram``: the input Gram (``GramStats``,
        tensor or a prepared ``Whitening``) when ``needs_grams``."""
        raise NotImplementedError

    def refine_layer(self, ctx: LayerContext, names: list[str], progress: Progress) -> Optional[dict]:
        """Improve ``ctx.factors[name]`` for ``names`` in place (sequential methods); returns a curve or None."""
        return None

    @property
    def refines(self) -> bool:
        return type(self).refine_layer is not Method.refine_layer


_REGISTRY: dict[str, Method] = {}


def register(cls: type) -> type:
    """Class decorator: add a method (by its ``name``) to the registry."""
    if cls.name in _REGISTRY:
        raise MethodError(f"method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def names() -> tuple[str, ...]:
    """Registered method names, in display order."""
    return tuple(sorted(_REGISTRY, key=lambda n: (_REGISTRY[n].order, n)))


def get(name: str) -> Method:
    """The method called ``name``; ``MethodError`` lists the allowed names."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise MethodError(f"unknown method {name!r}; allowed: {', '.join(names())}") from None


def help_text() -> str:
    """``name: summary`` of every method, for help strings."""
    return "; ".join(f"{n}: {_REGISTRY[n].summary}" for n in names())


