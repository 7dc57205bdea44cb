"""Recipes: one YAML file describing a whole compression job, validated up front, run headless.

Sections (every key optional unless marked; relative paths are relative to the current directory)::

    name: smollm2-exp3                       # default: the file's stem
    description: free text
    model:    {source: default, dtype: float32, device: auto}
    data:     {source: default, seed: 0, calib: 64, eval: 200, val: 0}    # the honest split (data.make_split)
    plan:     "17:mlp:r16"                   # REQUIRED: compact string, plan file, rule list or {rules: [...]}
    method:   {name: whitened, max_len: 512, batch_size: 4, layerwise: false, refit: {steps: 200, ...}}
    evaluate: {examples: 200, batch_size: 8, max_len: 512}                 # examples: <= data.eval (default all)
    export:   {format: dense, dir: exports/x, force: false, verify: true, verify_examples: 16}

``method`` accepts every field of ``compress.CompressSettings`` (``name`` for its ``method``; ``calib``
and ``seed`` come from ``data``) and ``method.refit`` every field of ``RefitSettings``; ``method: svd``
is short for ``method: {name: svd}``. Unknown keys and bad values raise :class:`RecipeError` naming the key
path, e.g. ``export.format: 'onnx' is not one of dense, factorized``.
"""
from __future__ import annotations

import re
import time
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional, Union

from .export import FORMATS, ExportResult
from .models import DEVICES, DTYPES
from .plan import Plan, PlanError, load_plan
from .progress import Progress, ensure_progress

_REQUIRED = object()


class RecipeError(ValueError):
    """A recipe that cannot be run; the message starts with the offending key path."""


@dataclass(frozen=True)
class Key:
    """One recipe key: accepted Python types, default, allowed values, lower bound."""

    types: tuple
    default: object = _REQUIRED
    choices: tuple = ()
    minimum: Optional[float] = None
    optional: bool = False  # None is accepted


def _device_ok(value: str) -> bool:
    return value in DEVICES or re.fullmatch(r"cuda:\d+", value) is not None


SCHEMA: dict = {
    "name": Key((str,), None, optional=True),
    "description": Key((str,), "", optional=True),
    "model": {"source": Key((str,), "default"), "dtype": Key((str,), "float32", choices=tuple(DTYPES)),
              "device": Key((str,), "auto")},
    "data": {"source": Key((str,), "default"), "seed": Key((int,), 0, minimum=0),
             "calib": Key((int,), 64, minimum=1), "eval": Key((int,), 200, minimum=1),
             "val": Key((int,), 0, minimum=0)},
    "plan": Key((str, list, dict)),
    "evaluate": {"examples": Key((int,), None, minimum=1, optional=True), "batch_size": Key((int,), 8, minimum=1),
                 "max_len": Key((int,), 512, minimum=8)},
    "export": {"format": Key((str,), "dense", choices=FORMATS), "dir": Key((str,)),
               "force": Key((bool,), False), "verify": Key((bool,), True),
               "verify_examples": Key((int,), 16, minimum=0)},
}
OPTIONAL_SECTIONS = ("export",)  # absent or null: the section is skipped (no export)
FROM_DATA = ("calib", "seed")     # CompressSettings fields the data section sets


def _types_of(annotation: str) -> tuple[tuple, bool]:
    """Python types (and whether None is allowed) of a dataclass field annotation string."""
    names = re.findall(r"[A-Za-z_]+", str(annotation))
    types = tuple(t for n, t in (("bool", bool), ("int", int), ("float", float), ("str", str)) if n in names)
    return types or (object,), "Optional" in names or "None" in names


def _dataclass_schema(cls, skip=()) -> dict:
    """Schema of a settings dataclass: each field's annotated type and its default."""
    schema = {}
    for f in fields(cls):
        if f.name in skip:
            continue
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = _REQUIRED
        types, optional = _types_of(f.type)
        schema[f.name] = Key(types, default, optional=optional)
    return schema


def method_schema() -> dict:
    """The ``method`` section derived from ``CompressSettings`` / ``RefitSettings`` (stays in sync)."""
    from . import methods
    from .compress import CompressSettings
    from .methods.refit import TARGETS, RefitSettings

    schema = _dataclass_schema(CompressSettings, skip=FROM_DATA + ("method", "refit"))
    schema["name"] = Key((str,), "whitened", choices=methods.names())
    schema["refit"] = _dataclass_schema(RefitSettings)
    schema["refit"]["target"] = Key((str,), schema["refit"]["target"].default, choices=TARGETS)
    return schema


def _fail(path: str, message: str) -> RecipeError:
    return RecipeError(f"{path}: {message}")


def _check_value(key: Key, value, path: str):
    if value is None:
        if key.optional:
            return None
        raise _fail(path, "a value is required")
    ok = isinstance(value, key.types) and not (isinstance(value, bool) and bool not in key.types)
    if not ok and float in key.types and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        allowed = " or ".join(t.__name__ for t in key.types)
        raise _fail(path, f"{value!r} is not a {allowed}")
    if key.choices and value not in key.choices:
        raise _fail(path, f"{value!r} is not one of {', '.join(map(str, key.choices))}")
    if key.minimum is not None and value < key.minimum:
        raise _fail(path, f"{value!r} is below the minimum {key.minimum:g}")
    return value


def _check_section(schema: dict, data, path: str) -> dict:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _fail(path, f"expected a mapping of {', '.join(schema)}, got {data!r}")
    unknown = [k for k in data if k not in schema]
    if unknown:
        where = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise _fail(where, f"unknown key; allowed {'in ' + path if path else 'at the top level'}: {', '.join(schema)}")
    out = {}
    for name, spec in schema.items():
        sub = f"{path}.{name}" if path else name
        if isinstance(spec, dict):
            out[name] = _check_section(spec, data.get(name), sub)
        elif name in data:
            out[name] = _check_value(spec, data[name], sub)
        elif spec.default is _REQUIRED:
            raise _fail(sub, "is required")
        else:
            out[name] = spec.default
    return out


@dataclass
class Recipe:
    """A validated recipe: every section filled with defaults; ``plan`` parsed; ``export`` may be None."""

    name: str
    description: str
    model: dict
    data: dict
    plan: Plan
    method: dict
    evaluate: dict
    export: Optional[dict]
    path: Optional[str] = None

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "model": self.model, "data": self.data,
                "plan": self.plan.to_dict(), "method": self.method, "evaluate": self.evaluate,
                "export": self.export}

    def compress_settings(self):
        from .compress import CompressSettings
        from .methods.refit import RefitSettings

        kw = {k: v for k, v in self.method.items() if k not in ("name", "refit")}
        return CompressSettings(method=self.method["name"], calib=self.data["calib"], seed=self.data["seed"],
                                refit=RefitSettings(**self.method["refit"]), **kw)


def validate_recipe(data, path: Optional[str] = None) -> Recipe:
    """Check a recipe mapping against :data:`SCHEMA` and return a :class:`Recipe` (raises RecipeError)."""
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a mapping of sections ({', '.join(SCHEMA)}), got {type(data).__name__}")
    data = dict(data)
    if isinstance(data.get("method"), str):
        data["method"] = {"name": data["method"]}
    schema = dict(SCHEMA, method=method_schema())
    if data.get("export") is None:
        data.pop("export", None)
        schema = {k: v for k, v in schema.items() if k not in OPTIONAL_SECTIONS}
    checked = _check_section(schema, data, "")
    try:
        plan = load_plan(checked["plan"])
    except PlanError as e:
        raise _fail("plan", str(e)) from None
    ev = checked["evaluate"]
    if ev["examples"] is not None and ev["examples"] > checked["data"]["eval"]:
        raise _fail("evaluate.examples", f"{ev['examples']} is more than the split's data.eval = "
                                         f"{checked['data']['eval']} examples")
    if not _device_ok(checked["model"]["device"]):
        raise _fail("model.device", f"{checked['model']['device']!r} is not one of {', '.join(DEVICES)} or cuda:N")
    name = checked["name"] or (Path(path).stem if path else "recipe")
    recipe = Recipe(name=name, description=checked["description"] or "", model=checked["model"],
                    data=checked["data"], plan=plan, method=checked["method"], evaluate=ev,
                    export=checked.get("export"), path=path)
    try:
        settings = recipe.compress_settings()
    except TypeError as e:
        raise _fail("method", str(e)) from None
    for where, check in (("method.refit", settings.refit.validate), ("method", settings.validate)):
        try:
            check()
        except ValueError as e:
            raise _fail(where, str(e)) from None
    return recipe


def load_recipe(source: Union[str, Path, dict], export: Optional[dict] = None) -> Recipe:
    """A validated recipe from a YAML/JSON file or a mapping; ``export`` keys override its export section."""
    path = None
    if isinstance(source, dict):
        data = dict(source)
    else:
        import yaml

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


# ----------------------------------------------------------------------------- running
def dry_run(recipe: Recipe):
    """The plan's exact parameter accounting from the model's config alone (no weights loaded)."""
    from .models import load_config
    from .plan import account

    return account(load_config(recipe.model["source"]), recipe.plan, recipe.method["name"])


@dataclass
class RunResult:
    recipe: dict
    accounting: dict
    split: dict
    teacher: dict          # EvalResult.to_dict()
    student: dict
    compress: dict         # CompressResult.to_dict()
    export: Optional[ExportResult]
    seconds: dict = field(default_factory=dict)  # per phase and total

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("recipe", "accounting", "split", "teacher", "student", "compress", "seconds")}
        d["export"] = self.export.to_dict() if self.export is not None else None
        return d


def _phase(progress: Progress, name: str) -> Progress:
    return lambda done, total, message="": progress(done, total, f"{name}: {message}")


def run_recipe(recipe: Recipe, progress: Optional[Progress] = None,
               log: Optional[Callable[[str], None]] = None) -> RunResult:
    """Run the whole job: load, split, compress, evaluate teacher vs student, export (and verify).

    ``log(message)`` is told when each phase starts. The plan and the export target are checked before
    any weight is loaded.
    """
    from .compress import compress
    from .data import make_split
    from .evaluate import evaluate_models
    from .export import build_manifest, check_target, export_student
    from .models import load_model

    progress, say = ensure_progress(progress), log or (lambda message: None)
    seconds: dict = {}
    start = t = time.perf_counter()

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        seconds[name], t = now - t, now

    accounting = dry_run(recipe)
    if recipe.export:
        check_target(Path(recipe.export["dir"]), recipe.export["force"])
    m, d, ev = recipe.model, recipe.data, recipe.evaluate
    say(f"loading model {m['source']} ({m['dtype']}, device {m['device']})")
    loaded = load_model(m["source"], dtype=m["dtype"], device=m["device"])
    lap("load")
    say(f"split of {d['source']}: {d['calib']} calibration / {d['eval']} evaluation examples, seed {d['seed']}")
    split = make_split(d["source"], n_calib=d["calib"], n_eval=d["eval"], n_val=d["val"], seed=d["seed"])
    lap("data")
    settings = recipe.compress_settings()
    say(f"compressing {len(accounting.rows)} matrices with {settings.method}")
    result = compress(loaded.model, loaded.tokenizer, recipe.plan, split.calib, settings,
                      progress=_phase(progress, "compress"))
    lap("compress")
    say(f"evaluating teacher and student on {ev['examples'] or len(split.eval)} examples")
    scores = evaluate_models({"teacher": loaded.model, "student": result.student}, loaded.tokenizer, split.eval,
                             n=ev["examples"], batch_size=ev["batch_size"], max_len=ev["max_len"],
                             progress=_phase(progress, "evaluate"))
    lap("evaluate")
    exported = None
    if recipe.export:
        x = recipe.export
        say(f"exporting {x['format']} to {x['dir']}")
        manifest = build_manifest(source=loaded.name, fingerprint=loaded.fingerprint, plan=recipe.plan,
                                  method=settings.method, settings=settings, split=split.info,
                                  teacher_metrics=scores["teacher"], student_metrics=scores["student"],
                                  recipe=recipe.to_dict(), layers=result.layers,
                                  accounting={k: v for k, v in accounting.to_dict().items() if k != "matrices"})
        exported = export_student(result.student, loaded.tokenizer, x["dir"], x["format"], manifest,
                                  force=x["force"], verify=x["verify"],
                                  eval_examples=split.eval[:x["verify_examples"]] or None,
                                  progress=_phase(progress, "export"))
        lap("export")
    seconds["total"] = time.perf_counter() - start
    return RunResult(recipe=recipe.to_dict(), accounting=accounting.to_dict(), split=split.info.to_dict(),
                     teacher=scores["teacher"].to_dict(), student=scores["student"].to_dict(),
                     compress=result.to_dict(), export=exported, seconds=seconds)
