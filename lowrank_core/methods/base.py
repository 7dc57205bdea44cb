"""The method interface and its registry: a method turns one dense linear into rank-r factors.

A method is a subclass of :class:`Method` in its own file of this package, decorated with
:func:`register`. What it declares decides the pipeline (``compress.py``), like llm-compressor's
modifiers choose their pipeline:

- ``needs_grams``: ``factorize`` reads the input Gram of the matrix (calibration runs first);
- ``output_covariance``: for an ``out <= in`` matrix ``factorize`` also accepts the output covariance
  ``Σ y yᵀ`` (``decompose.OutputCovariance``) in place of the input Gram: the fast pipeline then
  measures that instead where it is cheaper (``calibrate.cheaper_as_outputs``: down_proj);
- ``sequential``: the method must see the *student's* stream, so compression runs decoder layer by
  layer (``refine_layer`` is then called for each layer after its closed-form factors are built);
- ``settings_class``: the method's own settings, a dataclass of ``options.option(...)`` fields (with a
  ``validate()`` when a rule needs more than the fields' metadata). ``CompressSettings.method_settings``
  holds one instance per method that declares one (:func:`default_settings`); its flags are
  ``--<method>-<field>``, its recipe keys ``method.<method>.<field>`` and its Compress-page widgets are
  derived from the fields (``options.py``, ``ui/forms.py``); ``refine_layer`` reads it as
  ``ctx.settings.of(self.name)``. A ``derived`` field named ``seed`` follows the job's data seed.

The registry feeds plan validation, the CLI's ``--method`` choices and flags, the recipe schema and the
app's selectbox and forms; nothing else lists method names. Allocation asks it too: :func:`basis_method`
is the closed form a search profiles and walks, :func:`refining` the method of its optional final stage.
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
    ``CompressSettings`` of the run (a method's own settings: ``settings.of(method.name)``).
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
    settings_class: ClassVar[Optional[type]] = None   # the method's own settings (see the module docstring)

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

    @property
    def has_basis(self) -> bool:
        """The closed form has a solved basis, ``basis(weight, gram)``: its exact error at every rank and its
        factors at any rank (what allocation profiles)."""
        return callable(getattr(self, "basis", None))

    def validate_settings(self, settings) -> None:
        """Check this method's settings (an instance of ``settings_class``: its ``validate()``, if any);
        a plain ``ValueError`` names the bad value."""
        if self.settings_class is None:
            if settings is not None:
                raise ValueError(f"method {self.name!r} takes no settings, got {settings!r}")
            return
        if not isinstance(settings, self.settings_class):
            raise ValueError(f"settings of method {self.name!r} must be a {self.settings_class.__name__}, "
                             f"got {type(settings).__name__}")
        check = getattr(settings, "validate", None)
        if callable(check):
            check()


_REGISTRY: dict[str, Method] = {}


def register(cls: type) -> type:
    """Class decorator: add a method (by its ``name``) to the registry."""
    if cls.name in _REGISTRY:
        raise MethodError(f"method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Remove a method from the registry (a test's own method, once the test is done)."""
    get(name)
    del _REGISTRY[name]


def names() -> tuple[str, ...]:
    """Registered method names, in display order."""
    return tuple(sorted(_REGISTRY, key=lambda n: (_REGISTRY[n].order, n)))


def get(name: str) -> Method:
    """The method called ``name``; ``MethodError`` lists the allowed names."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise MethodError(f"unknown method {name!r}; allowed: {', '.join(names())}") from None


def settings_classes() -> dict[str, type]:
    """``{name: settings_class}`` of every method that declares settings, in display order."""
    return {n: _REGISTRY[n].settings_class for n in names() if _REGISTRY[n].settings_class is not None}


def default_settings() -> dict[str, object]:
    """``{name: default settings}`` of every method that declares settings (``CompressSettings``'s default)."""
    return {n: cls() for n, cls in settings_classes().items()}


def basis_method() -> str:
    """The first method (display order) whose closed form has a solved basis and that needs no layer-by-layer
    refinement: the factors an allocation search profiles and measures along its greedy path."""
    found = next((n for n in names() if _REGISTRY[n].has_basis and not _REGISTRY[n].sequential), None)
    if found is None:
        raise MethodError("no registered method has a solved basis (``basis(weight, gram)``) without refinement")
    return found


def refining(base: str) -> Optional[str]:
    """The first method (display order) that refines ``base``'s closed form layer by layer: a subclass of
    ``base``'s class (its closed-form ``factorize`` inherited) with a ``refine_layer`` (``refit`` for
    ``whitened``): the final stage of an allocation search. None when there is none."""
    kind = type(get(base))
    return next((n for n in names() if n != base and isinstance(_REGISTRY[n], kind) and _REGISTRY[n].refines), None)


def help_text() -> str:
    """``name: summary`` of every method, for help strings."""
    return "; ".join(f"{n}: {_REGISTRY[n].summary}" for n in names())


