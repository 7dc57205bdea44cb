"""Recipes: one YAML file describing a whole job (a :class:`~lowrank_core.job.JobSpec`), validated up front.

Sections (every key optional unless marked; relative paths are relative to the current directory)::

    name: smollm2-exp3                       # default: the file's stem
    description: free text
    model:    {source: default, dtype: float32, device: auto}
    data:     {source: default, seed: 0, calib: 64, eval: 200, val: 0}    # the honest split
    plan:     "17:mlp:r16"                   # REQUIRED: compact string, plan file, rule list or {rules: [...]}
                                             # rank rounding: {rules: [...], rank_multiple: 64} or "...; rank_multiple=64"
    method:   {name: whitened, max_len: 512, batch_size: 4, layerwise: false, refit: {steps: 200, ...}}
                                             # <method>: {...}: the settings a method declares (methods/)
    heal:     {tokens: 200k, loss: kl, lr: 1.0e-4, batch_tokens: 2048, max_len: 256}  # end-to-end distillation
    evaluate: {examples: 200, batch_size: 8, max_len: 512}                 # examples: <= data.eval
    export:   {format: dense, dir: exports/x, force: false, verify: true, verify_examples: 16}

The keys of ``model``, ``data``, ``method``, ``heal``, ``evaluate`` and ``export`` are the fields of
``ModelSpec``, ``DataSpec``, ``CompressSettings`` (``name`` for its ``method``; ``calib`` and ``seed``
come from ``data``; one sub-mapping per registered method that declares settings, its keys that
method's ``settings_class`` fields), ``HealSettings``, ``EvalSpec`` and ``ExportSpec``, with their
defaults: nothing is listed twice.
``method: svd`` is short for ``method: {name: svd}``. Unknown keys and bad values raise
:class:`RecipeError` naming the key path, e.g. ``export.format: 'onnx' is not one of dense, factorized``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from . import methods
from .compress import CompressSettings
from .heal import HealSettings
from .job import DataSpec, EvalSpec, ExportSpec, JobSpec, ModelSpec
from .options import OptionError, check_mapping
from .plan import PlanError, load_plan

SECTIONS = {"model": ModelSpec, "data": DataSpec, "method": CompressSettings, "heal": HealSettings,
            "evaluate": EvalSpec, "export": ExportSpec}
TOP_KEYS = ("name", "description", "model", "data", "plan", "method", "heal", "evaluate", "export")


class RecipeError(ValueError):
    """A recipe that cannot be run; the message starts with the offending key path."""


def _text(data: dict, key: str) -> Optional[str]:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise RecipeError(f"{key}: {value!r} is not a str")
    return value


def validate_recipe(data, path: Optional[str] = None) -> JobSpec:
    """Check a recipe mapping and return its :class:`JobSpec` (raises RecipeError naming the key)."""
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a mapping of sections ({', '.join(TOP_KEYS)}), got {type(data).__name__}")
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise RecipeError(f"{unknown[0]}: unknown key; allowed at the top level: {', '.join(TOP_KEYS)}")
    data = dict(data)
    if isinstance(data.get("method"), str):
        data["method"] = {"name": data["method"]}
    if data.get("plan") is None:
        raise RecipeError("plan: is required")
    try:
        sections = {name: check_mapping(cls, data.get(name), name) for name, cls in SECTIONS.items()
                    if name != "export" or data.get("export") is not None}
    except OptionError as e:
        raise RecipeError(str(e)) from None
    try:
        plan = load_plan(data["plan"])
    except PlanError as e:
        raise RecipeError(f"plan: {e}") from None
    name = _text(data, "name") or (Path(path).stem if path else "recipe")
    spec = JobSpec(plan=plan, name=name, description=_text(data, "description") or "",
                   export=sections.pop("export", None), **sections)
    settings = spec.settings()
    checks = [(f"method.{name}", lambda name=name, own=own: methods.get(name).validate_settings(own))
              for name, own in settings.method_settings.items()]
    checks += [("method", settings.validate), ("heal", spec.heal.validate)]
    for where, check in checks:
        try:
            check()
        except ValueError as e:
            raise RecipeError(f"{where}: {e}") from None
    if spec.evaluate.examples is not None and spec.evaluate.examples > spec.data.eval:
        raise RecipeError(f"evaluate.examples: {spec.evaluate.examples} is more than the split's data.eval = "
                          f"{spec.data.eval} examples")
    return spec


def load_recipe(source: Union[str, Path, dict], export: Optional[dict] = None) -> JobSpec:
    """A validated recipe from a YAML/JSON file or a mapping; ``export`` keys override its export section."""
    import yaml

    path = None
    if isinstance(source, dict):
        data = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise RecipeError(f"recipe file {str(source)!r} not found")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise RecipeError(f"recipe {path} is not valid YAML: {e}") from None
    if export and isinstance(data, dict):
        data = dict(data, export={**(data.get("export") or {}), **export})
    return validate_recipe(data, str(path) if path else None)
