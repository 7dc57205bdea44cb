"""``lowrank.json``, the manifest in every export: what was compressed, how, on which data, with what result."""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Optional, Union

from torch import nn

from .. import __version__
from ..linears import count_parameters
from ..lowrank import low_rank_modules, ranks_of
from ..plan import load_plan
from ..threads import runtime_record
from ..weightfiles import MANIFEST
from .card import invocation


def _plain(value):
    """JSON-ready form of dataclasses, objects with ``to_dict``, tensors, paths."""
    if hasattr(value, "to_dict"):
        return _plain(value.to_dict())
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def build_manifest(source=None, fingerprint=None, plan=None, method=None, settings=None, split=None,
                   teacher_metrics=None, student_metrics=None, **extra) -> dict:
    """The caller's part of ``lowrank.json``: what was compressed, how, on which data, with what result.

    ``plan`` may be a Plan, dict or string; ``settings``/``split``/metrics dataclasses or dicts.
    """
    return _plain({
        "source": {"model": source, "fingerprint": fingerprint},
        "plan": load_plan(plan).to_dict() if plan is not None else None,
        "method": {"name": method, "settings": settings},
        "split": split,
        "metrics": {"teacher": teacher_metrics, "student": student_metrics},
        **extra,
    })


def dense_parameter_count(model: nn.Module) -> int:
    """Unique parameters once every low-rank module is merged back into an ``out x in`` weight."""
    extra = sum(m.up.weight.shape[0] * m.down.weight.shape[1] - m.down.weight.numel() - m.up.weight.numel()
                for m in low_rank_modules(model).values())
    return count_parameters(model) + extra


def complete_manifest(manifest: Optional[dict], student: nn.Module, format: str) -> dict:
    """The caller's ``manifest`` plus format, ranks, parameters (in memory / stored), tool version, UTC time,
    and, unless the caller gave them, ``command`` (the CLI invocation, or None), ``runtime`` and ``threads``
    (``threads.runtime_record``: the thread count a rerun needs to reproduce the numbers bit for bit)."""
    m = build_manifest()
    m.update(_plain(manifest or {}))
    m.setdefault("command", invocation())
    m.setdefault("runtime", runtime_record())
    m.setdefault("threads", m["runtime"].get("threads"))
    stored = count_parameters(student) if format == "factorized" else dense_parameter_count(student)
    m.update(format=format, ranks=ranks_of(student),
             parameters={"student": count_parameters(student), "stored": stored},
             tool={"name": "lowrank", "version": __version__},
             created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    return m


def write_manifest(folder: Path, manifest: dict) -> None:
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(folder: Union[str, Path]) -> dict:
    return json.loads((Path(folder) / MANIFEST).read_text())
