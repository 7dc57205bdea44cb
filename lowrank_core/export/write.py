"""Export a compressed student: ``dense`` (factors merged, plain transformers) or ``factorized``.

- ``dense``: every low-rank module is merged back into an ``nn.Linear`` weight ``up @ down [out, in]``;
  the folder (safetensors, config, generation config, tokenizer with chat template) loads with plain
  ``AutoModelForCausalLM.from_pretrained(dir)``.
- ``factorized``: safetensors hold ``<name>.down.weight [r, in]``, ``<name>.up.weight [out, r]`` (and
  ``up.bias``) plus every untouched weight; ``config.json`` records ``lowrank_ranks`` ({name: rank}) and an
  ``auto_map`` to the copied ``modeling_lowrank.py``, so ``from_pretrained(dir, trust_remote_code=True)``
  works without lowrank_core; :func:`load_factorized` loads it with lowrank_core's own classes.

Every export holds ``lowrank.json`` (the manifest). Writing goes to a temporary sibling folder that is
renamed into place only after the export has been reloaded and checked against the in-memory student;
any error (also Ctrl-C) removes it. The student shares tensors with the teacher: nothing is modified.
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from . import __version__
from .progress import Progress, ensure_progress

FORMATS = ("dense", "factorized")
MANIFEST = "lowrank.json"
MODELING_FILE = "modeling_lowrank.py"
MAX_SHARD_BYTES = 4 * 1024 ** 3
DEFAULT_PROBE = ("What is the capital of France? Answer in one sentence.",
                 "Write a haiku about low-rank matrices and explain it.")
# Tolerated max |logit difference| after reload, relative to max(1, max |student logit|).
REL_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}


class ExportError(ValueError):
    """An export that cannot be written (bad format, existing target, unsupported model)."""


class ExportVerificationError(ExportError):
    """The written export did not reload to the in-memory student; nothing was left in place."""


@dataclass
class ExportResult:
    path: str
    format: str
    bytes_on_disk: int              # every file of the export folder
    weight_bytes: int               # the safetensors files only
    parameters: int                 # unique parameters stored (tied weights once)
    ranks: dict                     # {matrix name: rank} of the replaced matrices
    verified: bool
    max_logit_diff: Optional[float]  # max |reloaded - student| logits on the probe batch
    tolerance: Optional[float]
    reload_loss: Optional[float]    # answer loss of the reloaded export on eval_examples
    student_loss: Optional[float]   # the in-memory student on the same batches
    seconds: dict = field(default_factory=dict)  # write, verify, total

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- model inspection
def low_rank_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of every low-rank module (``down`` and ``up`` ``nn.Linear`` children)."""
    return {name: mod for name, mod in model.named_modules()
            if isinstance(getattr(mod, "down", None), nn.Linear) and isinstance(getattr(mod, "up", None), nn.Linear)}


def _ranks(model: nn.Module) -> dict[str, int]:
    return {name: int(mod.down.weight.shape[0]) for name, mod in low_rank_modules(model).items()}


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the untouched weights (the embedding), which the export keeps."""
    return model.get_input_embeddings().weight.dtype


def _merged_weight(mod: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``up @ down`` [out, in] of a low-rank module, multiplied in float32, returned in ``dtype``."""
    return (mod.up.weight.detach().float() @ mod.down.weight.detach().float()).to(dtype)


def dense_parameter_count(model: nn.Module) -> int:
    """Unique parameters once every low-rank module is merged back into an ``out x in`` weight."""
    from .archmap import count_parameters

    extra = sum(m.up.weight.shape[0] * m.down.weight.shape[1] - m.down.weight.numel() - m.up.weight.numel()
                for m in low_rank_modules(model).values())
    return count_parameters(model) + extra


def _tied_head(model: nn.Module) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


# ----------------------------------------------------------------------------- tensors to write
FACTOR_KEYS = (".down.weight", ".up.weight", ".up.bias")


def _factor_owner(key: str, low: dict) -> Optional[str]:
    """``<name>`` for a state-dict key ``<name>.down.weight`` / ``.up.weight`` / ``.up.bias`` of a low-rank module."""
    for suffix in FACTOR_KEYS:
        if key.endswith(suffix) and key[: -len(suffix)] in low:
            return key[: -len(suffix)]
    return None


def _dense_tensors(model: nn.Module) -> dict[str, Callable[[], torch.Tensor]]:
    """{key: thunk} of the merged model's state dict; merged weights are computed only when written."""
    dtype = _model_dtype(model)
    low = low_rank_modules(model)
    out: dict[str, Callable[[], torch.Tensor]] = {}
    for key, tensor in _unique_state(model).items():
        name = _factor_owner(key, low)
        if name is None:
            out[key] = (lambda t=tensor: t)
        elif name + ".weight" not in out:  # the merged matrix stands where its factors stood
            mod = low[name]
            out[name + ".weight"] = (lambda m=mod: _merged_weight(m, dtype))
            if mod.up.bias is not None:
                out[name + ".bias"] = (lambda b=mod.up.bias: b.detach().to(dtype))
    return out


def _factorized_tensors(model: nn.Module) -> dict[str, Callable[[], torch.Tensor]]:
    return {key: (lambda t=tensor: t) for key, tensor in _unique_state(model).items()}


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without tied duplicates (safetensors refuses shared tensors; HF re-ties on load)."""
    seen: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict(keep_vars=False).items():
        ident = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if tensor.numel() and ident in seen:
            if key == "lm_head.weight" and _tied_head(model):
                continue
            raise ExportError(f"{key} shares its storage with {seen[ident]} but is not a tied lm_head; "
                              "cannot write it without duplicating it")
        seen[ident] = key
        out[key] = tensor
    return out


def _sizes(thunks: dict[str, Callable[[], torch.Tensor]], model: nn.Module) -> dict[str, int]:
    """Bytes of every tensor to write, without materialising merged weights."""
    dtype_size = torch.empty((), dtype=_model_dtype(model)).element_size()
    low = low_rank_modules(model)
    sizes = {}
    for key in thunks:
        name, _, leaf = key.rpartition(".")
        if name in low and leaf == "weight":
            sizes[key] = low[name].up.weight.shape[0] * low[name].down.weight.shape[1] * dtype_size
        elif name in low and leaf == "bias":
            sizes[key] = low[name].up.weight.shape[0] * dtype_size
        else:
            t = thunks[key]()
            sizes[key] = t.numel() * t.element_size()
    return sizes


def write_safetensors(thunks: dict[str, Callable[[], torch.Tensor]], sizes: dict[str, int], folder: Path,
                      max_shard_bytes: int = MAX_SHARD_BYTES, progress: Optional[Progress] = None) -> list[str]:
    """Write ``model.safetensors`` or shards + ``model.safetensors.index.json`` (the HF layout).

    Tensors are materialised one shard at a time and copied to CPU; returns the file names written.
    """
    from safetensors.torch import save_file

    progress = ensure_progress(progress)
    shards: list[list[str]] = [[]]
    filled = 0
    for key in thunks:
        if shards[-1] and filled + sizes[key] > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(key)
        filled += sizes[key]
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, (keys, fname) in enumerate(zip(shards, names)):
        progress(i, n, f"writing {fname}")
        tensors = {k: thunks[k]().detach().to("cpu").contiguous() for k in keys}
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    if n > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {k: fname for keys, fname in zip(shards, names) for k in keys}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    progress(n, n, "weights written")
    return names


# ----------------------------------------------------------------------------- configs
def _dense_config(model: nn.Module):
    import copy

    config = copy.deepcopy(model.config)
    if "lm_head" in low_rank_modules(model) and _tied_head(model):
        config.tie_word_embeddings = False  # the merged head is its own matrix now
    config.dtype = _model_dtype(model)
    return config


def _factorized_config(model: nn.Module) -> dict:
    from .modeling_lowrank import CLASS_NAMES

    base = model.config.model_type
    if base not in CLASS_NAMES:
        raise ExportError(f"factorized export supports model types {', '.join(CLASS_NAMES)}, not {base!r}")
    config_cls, model_cls = CLASS_NAMES[base]
    d = model.config.to_dict()
    ranks = _ranks(model)
    d.update(model_type=f"lowrank_{base}", architectures=[model_cls], lowrank_base_model_type=base,
             lowrank_ranks=ranks, dtype=str(_model_dtype(model)).replace("torch.", ""),
             auto_map={"AutoConfig": f"{MODELING_FILE[:-3]}.{config_cls}",
                       "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{model_cls}"})
    if "lm_head" in ranks:
        d["tie_word_embeddings"] = False
    return d


def write_export(student: nn.Module, tokenizer, folder: Path, format: str,
                 max_shard_bytes: int = MAX_SHARD_BYTES, progress: Optional[Progress] = None) -> None:
    """Write weights, config, generation config, tokenizer (and the modeling file) into ``folder``."""
    thunks = _dense_tensors(student) if format == "dense" else _factorized_tensors(student)
    write_safetensors(thunks, _sizes(thunks, student), folder, max_shard_bytes, progress)
    if format == "dense":
        _dense_config(student).save_pretrained(folder)
    else:
        (folder / "config.json").write_text(json.dumps(_factorized_config(student), indent=2, default=str) + "\n")
        shutil.copyfile(Path(__file__).with_name(MODELING_FILE), folder / MODELING_FILE)
    generation = getattr(student, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


# ----------------------------------------------------------------------------- manifest
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
    from .plan import load_plan

    return _plain({
        "source": {"model": source, "fingerprint": fingerprint},
        "plan": load_plan(plan).to_dict() if plan is not None else None,
        "method": {"name": method, "settings": settings},
        "split": split,
        "metrics": {"teacher": teacher_metrics, "student": student_metrics},
        **extra,
    })


def _complete_manifest(manifest: Optional[dict], student: nn.Module, format: str) -> dict:
    from .archmap import count_parameters

    m = build_manifest()
    m.update(_plain(manifest or {}))
    stored = count_parameters(student) if format == "factorized" else dense_parameter_count(student)
    m.update(format=format, ranks=_ranks(student),
             parameters={"student": count_parameters(student), "stored": stored},
             tool={"name": "lowrank", "version": __version__},
             created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    return m


def read_manifest(folder: Union[str, Path]) -> dict:
    return json.loads((Path(folder) / MANIFEST).read_text())


# ----------------------------------------------------------------------------- verification
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

    kw = dict(dtype=dtype, output_loading_info=True)
    if torch.device(device).type == "cuda":
        kw["device_map"] = {"": str(device)}
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # our own progress reports the phase
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=(format == "factorized"),
                                                           **kw)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.to(device).eval(), info


def _check_tokenizer(folder: Path, format: str, probes: Sequence[torch.Tensor], probe, device) -> None:
    """The saved tokenizer (and chat template) must encode the probe texts exactly as the original."""
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=(format == "factorized"))
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
    dtype = _model_dtype(student)
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
            from .evaluate import evaluate_models

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


# ----------------------------------------------------------------------------- safe writing
def check_target(target: Path, force: bool) -> None:
    """Raise ExportError if ``target`` exists and may not (or must not) be replaced."""
    target = Path(target).expanduser().absolute()
    if not target.exists():
        return
    if not force:
        raise ExportError(f"export target {target} already exists; choose another folder or force overwrite (--force)")
    if not target.is_dir():
        raise ExportError(f"export target {target} exists and is not a folder; refusing to replace it")
    if any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise ExportError(f"refusing to overwrite {target}: it is not empty and not a lowrank export (no {MANIFEST})")


def _temp_sibling(target: Path, tag: str) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{tag}-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; an export folder gets ordinary permissions
    return tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _ordinary_permissions(folder: Path) -> None:
    """Files as a plain ``open()`` would create them (some writers use 0600)."""
    mode = 0o666 & ~_umask()
    for p in folder.rglob("*"):
        if p.is_file():
            os.chmod(p, mode)


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing target is swapped out first and removed only afterwards."""
    if not target.exists():
        os.replace(tmp, target)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(backup)
    os.replace(target, backup)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _folder_bytes(folder: Path, suffix: str = "") -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name.endswith(suffix))


def export_student(student: nn.Module, tokenizer, target_dir: Union[str, Path], format: str = "dense",
                   manifest: Optional[dict] = None, force: bool = False, verify: bool = True, probe=None,
                   eval_examples=None, tolerance: Optional[float] = None,
                   max_shard_bytes: int = MAX_SHARD_BYTES, progress: Optional[Progress] = None) -> ExportResult:
    """Write ``student`` to ``target_dir`` as a ``dense`` or ``factorized`` export and verify it.

    ``manifest``: the caller's part of ``lowrank.json`` (see :func:`build_manifest`); ranks, parameters,
    tool version, creation time and the verification result are added here. ``probe``: texts or input
    ids [B, T] for the logit comparison (default: two short chat prompts). ``eval_examples``: examples
    whose answer loss is computed on the reloaded export and on the student. Raises ExportError for a bad
    format or an existing target without ``force``; ExportVerificationError when the reload differs.
    """
    from .archmap import count_parameters

    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; allowed: {', '.join(FORMATS)}")
    target = Path(target_dir).expanduser().absolute()
    check_target(target, force)
    progress = ensure_progress(progress)
    t0 = time.perf_counter()
    tmp = _temp_sibling(target, "tmp")
    try:
        full = _complete_manifest(manifest, student, format)
        write_export(student, tokenizer, tmp, format, max_shard_bytes, progress)
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
        t_write = time.perf_counter() - t0
        check = {"max_logit_diff": None, "tolerance": None, "reload_loss": None, "student_loss": None}
        if verify:
            check = verify_export(student, tokenizer, tmp, format, probe, eval_examples, tolerance, progress)
            full["verification"] = check
            (tmp / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
        t_verify = time.perf_counter() - t0 - t_write
        _ordinary_permissions(tmp)
        check_target(target, force)  # the target may have appeared meanwhile
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(path=str(target), format=format, bytes_on_disk=_folder_bytes(target),
                        weight_bytes=_folder_bytes(target, ".safetensors"),
                        parameters=full["parameters"]["stored"], ranks=full["ranks"], verified=bool(verify), **check,
                        seconds={"write": t_write, "verify": t_verify, "total": time.perf_counter() - t0})


# ----------------------------------------------------------------------------- loading with lowrank_core
def load_factorized(folder: Union[str, Path], dtype: Optional[str] = None, device: str = "cpu"):
    """Load a factorized export with lowrank_core's own ``LowRankLinear`` -> ``models.LoadedModel``.

    Reads safetensors only; the model is built with empty weights, the factors are assigned as stored
    (cast to ``dtype`` if given: float32/bfloat16/float16), tied embeddings are re-tied.
    """
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .lowrank import LowRankLinear
    from .models import LoadedModel, model_fingerprint, resolve_device, resolve_dtype

    folder = Path(folder).expanduser()
    raw = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    if "lowrank_ranks" not in raw or "lowrank_base_model_type" not in raw:
        raise ExportError(f"{folder} is not a factorized lowrank export (config.json lacks lowrank_ranks); "
                          "load a dense export with models.load_model or transformers")
    ranks = raw.pop("lowrank_ranks")
    base = raw.pop("lowrank_base_model_type")
    for key in ("auto_map", "architectures", "model_type"):
        raw.pop(key, None)
    config = AutoConfig.for_model(base, **raw)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
        for name, rank in ranks.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child)
            setattr(parent, child, LowRankLinear(old.in_features, old.out_features, rank, bias=old.bias is not None))
    state: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(path)))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ExportError(f"{folder}: weights do not match the recorded ranks: missing {missing}, "
                          f"unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    torch_dtype = resolve_dtype(dtype) if dtype is not None else _model_dtype(model)
    model = model.to(device=resolve_device(device), dtype=torch_dtype).eval()
    model.requires_grad_(False)
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return LoadedModel(model, tokenizer, str(folder), model_fingerprint(model),
                       str(torch_dtype).replace("torch.", ""), str(next(model.parameters()).device))
