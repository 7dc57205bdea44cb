"""What lowrank accepts from a model folder: a JSON config, tokenizer files and safetensors weights; nothing
in it is executed or unpickled.

- :func:`check_weight_files`: a folder whose weights are only pickles (``pytorch_model.bin``, ``*.pt``,
  ``*.pth``, ``*.ckpt``, ``*.pkl``) is refused before any file is opened, with the line that converts it
  once (where the file is trusted); ``load_model`` passes ``use_safetensors=True`` to every
  ``from_pretrained`` of weights, so transformers never falls back to ``torch.load``.
- :func:`custom_code_error`: a config whose ``model_type`` transformers does not know and that names its
  own code (``auto_map``) is refused naming the type: lowrank never runs a folder's code
  (``trust_remote_code`` stays False; there is no flag to turn it on).

Imports nothing of the package.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def pickled_weights(folder: Path) -> list[str]:
    """Names of the pickle weight files of ``folder`` (top level)."""
    return sorted(p.name for p in Path(folder).iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def check_weight_files(folder: Path, source: str, error=ValueError) -> None:
    """``error`` when ``folder`` holds pickled weights but no ``.safetensors`` file."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        return
    pickles = pickled_weights(folder)
    if not pickles:
        return
    raise error(f"model folder {source!r} holds only pickled weights ({', '.join(pickles[:3])}"
                f"{', ...' if len(pickles) > 3 else ''}), which lowrank never loads (unpickling can run code); "
                "convert it once where you trust the file: python -c \"from transformers import "
                f"AutoModelForCausalLM as M; M.from_pretrained('{folder}', use_safetensors=False)"
                f".save_pretrained('{folder}-safetensors')\" and pass {str(folder) + '-safetensors'!r}")


def raw_config(location: Path) -> Optional[dict]:
    """``location`` (a ``config.json`` file, or a folder holding one) as a dict, or None when it is missing or
    not a JSON object."""
    location = Path(location)
    try:
        raw = json.loads((location if location.is_file() else location / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def custom_code_error(location: Path, source: str, known_types, error=ValueError) -> Optional[Exception]:
    """``error`` (returned, not raised) when the config (a file or a folder's ``config.json``) has a ``model_type`` outside ``known_types``
    (transformers' own) or none, and an ``auto_map`` naming code of the folder; else None."""
    raw = raw_config(location)
    if raw is None or "auto_map" not in raw:
        return None
    model_type = raw.get("model_type")
    if isinstance(model_type, str) and model_type in known_types:
        return None
    return error(f"model source {source!r} has model_type {model_type!r}, which transformers does not know, and "
                 "its config names its own code (auto_map); lowrank never runs code from a model folder; use a "
                 "model of an architecture transformers ships (e.g. llama, mistral, qwen2)")
