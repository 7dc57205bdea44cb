"""What every export module shares: the error, the formats, the modeling file's name, the kept dtype."""
from __future__ import annotations

import torch
from torch import nn

from ..rescue import WriteFailed

FORMATS = ("dense", "factorized")
MODELING_FILE = "modeling_lowrank.py"  # copied into every factorized export


class ExportError(ValueError):
    """An export that cannot be written or read (bad format, existing target, unsupported model)."""


class ExportWriteError(ExportError, WriteFailed):
    """Writing an export failed (full disk, a concurrent writer, ...); the message names the target."""


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the untouched weights (the embedding), which the export keeps."""
    return model.get_input_embeddings().weight.dtype
