"""Loading a factorized export back into lowrank_core (its own ``LowRankLinear``, no remote code).

The model building lives in :mod:`lowrank_core.models` (a factorized export is one of its sources);
this module is the export-side entry point, which refuses any other folder and keeps the stored dtype.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from ..models import LoadedModel, factorized_export_config, load_model
from .common import ExportError


def load_factorized(folder: Union[str, Path], dtype: Optional[str] = None, device: str = "cpu") -> LoadedModel:
    """Load a factorized export -> ``models.LoadedModel`` with a ``LowRankLinear`` per recorded rank.

    ``dtype`` (float32/bfloat16/float16) casts the weights; None keeps the dtype they were exported in.
    """
    raw = factorized_export_config(folder)
    if raw is None:
        raise ExportError(f"{folder} is not a factorized lowrank export (config.json lacks lowrank_ranks); "
                          "load a dense export with models.load_model or transformers")
    return load_model(str(folder), dtype=dtype or raw.get("dtype") or "float32", device=device)
