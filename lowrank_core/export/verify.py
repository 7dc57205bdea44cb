"""Checking a written export: reload it as a user would and compare it with the in-memory student.

The probe logits of the reloaded export must match the student's within a relative tolerance, the
saved tokenizer must encode the probe texts like the original, and no weight may be missing,
unexpected or mismatched; optionally the answer loss of both is computed on held-out examples.
"""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..evaluate import evaluate_models
from ..progress import Progress, ensure_progress
from .common import ExportError, model_dtype

DEFAULT_PROBE = ("What is the capital of France? Answer in one sentence.",
                 "Write a haiku about low-rank matrices and explain it.")
# Tolerated max |logit difference| after reload, relative to max(1, max |student logit|).
REL_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}


class ExportVerificationError(ExportError):
    """The written export did not reload to the in-memory student; nothing was left in place."""


def _probe_ids(tokenizer, probe, device) -> list[torch.Tensor]:
    """Probe inputs as a list of [1, T] id tensors: from texts (chat-rendered) or given ids."""
    if isinstance(probe, torch.Tensor):
        ids = probe if probe.dim() == 2 else probe.unsqueeze(0)
        return [row.unsqueeze(0).to(device) for row in ids]
    texts = [probe] if isinstance(probe, str) else list(probe or DEFAULT_PROBE)
    out = []
    for text in texts:
        if getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                     add_generation_prompt=True)
        else:
            rendered = text
        ids = tokenizer(rendered, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out.append(ids.to(device))
    return out


@torch.no_grad()
def _max_logit_diff(student: nn.Module, reloaded: nn.Module, probes: Sequence[torch.Tensor]) -> tuple[float, float]:
    """(max |reloaded - student| logit difference, max |student logit|) over the probe inputs."""
    diff, scale = 0.0, 0.0
    for ids in probes:
        a = student(input_ids=ids).logits.float()
        b = reloaded(input_ids=ids).logits.float()
        diff = max(diff, (a - b).abs().max().item())
        scale = max(scale, a.abs().max().item())
    return diff, scale


def reload_export(folder: Union[str, Path], format: str, dtype: torch.dtype, device) -> tuple[nn.Module, dict]:
    """Load an export as a user would (plain transformers; remote code for factorized) -> (model, info)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    kw = dict(dtype=dtype, output_loading_info=True)
    if torch.device(device).type == "cuda":
        kw["device_map"] = {"": str(device)}
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # our own progress reports the phase
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=(format == "factorized"),
                                                           use_safetensors=True, **kw)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.to(device).eval(), info


def _check_tokenizer(folder: Path, format: str, probes: Sequence[torch.Tensor], probe, device) -> None:
    """The saved tokenizer (and chat template) must encode the probe texts exactly as the original."""
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    for a, b in zip(probes, _probe_ids(saved, probe, device)):
        if not torch.equal(a, b):
            raise ExportVerificationError(f"the tokenizer saved in {folder} encodes the probe text differently "
                                          f"from the original ({b.shape[1]} vs {a.shape[1]} tokens)")


def verify_export(student: nn.Module, tokenizer, folder: Path, format: str, probe=None, eval_examples=None,
                  tolerance: Optional[float] = None, progress: Optional[Progress] = None) -> dict:
    """Reload ``folder`` and compare with ``student``; raises ExportVerificationError on a mismatch.

    Returns max_logit_diff, tolerance, reload_loss, student_loss (losses only with ``eval_examples``).
    """
    progress = ensure_progress(progress)
    device = next(student.parameters()).device
    dtype = model_dtype(student)
    progress(0, 3, "reloading export")
    reloaded, info = reload_export(folder, format, dtype, device)
    try:
        bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:
            raise ExportVerificationError(f"export {folder} reloads with {bad}")
        progress(1, 3, "comparing logits")
        probes = _probe_ids(tokenizer, probe, device)
        if tokenizer is not None and not isinstance(probe, torch.Tensor):
            _check_tokenizer(folder, format, probes, probe, device)
        diff, scale = _max_logit_diff(student, reloaded, probes)
        tol = (tolerance if tolerance is not None else REL_TOLERANCE.get(dtype, 5e-2)) * max(1.0, scale)
        if not diff <= tol:  # also catches NaN
            raise ExportVerificationError(f"reloaded {format} export differs from the in-memory student: max |logit "
                                          f"difference| {diff:.4g} > tolerance {tol:.4g}")
        result = {"max_logit_diff": diff, "tolerance": tol, "reload_loss": None, "student_loss": None}
        if eval_examples:
            progress(2, 3, "reload loss")
            scores = evaluate_models({"student": student, "reloaded": reloaded}, tokenizer, list(eval_examples))
            result.update(reload_loss=scores["reloaded"].loss, student_loss=scores["student"].loss)
        progress(3, 3, "verified")
        return result
    finally:
        del reloaded
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
