"""What every export module shares: the error, the formats, and how a student's low-rank modules are found."""
from __future__ import annotations

import torch
from torch import nn

FORMATS = ("dense", "factorized")
MODELING_FILE = "modeling_lowrank.py"  # copied into every factorized export


class ExportError(ValueError):
    """An export that cannot be written or read (bad format, existing target, unsupported model)."""


def low_rank_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of every low-rank module (``down`` and ``up`` ``nn.Linear`` children)."""
    return {name: mod for name, mod in model.named_modules()
            if isinstance(getattr(mod, "down", None), nn.Linear) and isinstance(getattr(mod, "up", None), nn.Linear)}


def ranks_of(model: nn.Module) -> dict[str, int]:
    """{module name: rank} of every low-rank module (the rows of its ``down.weight [r, in]``)."""
    return {name: int(mod.down.weight.shape[0]) for name, mod in low_rank_modules(model).items()}


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the untouched weights (the embedding), which the export keeps."""
    return model.get_input_embeddings().weight.dtype
