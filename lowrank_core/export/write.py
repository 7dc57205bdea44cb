"""Writing an export folder: tensors, config, modeling file, tokenizer; safely, then verified, then moved.

- ``dense``: every low-rank module is merged back into an ``nn.Linear`` weight ``up @ down [out, in]``;
  the folder (safetensors, config, generation config, tokenizer with chat template) loads with plain
  ``AutoModelForCausalLM.from_pretrained(dir)``.
- ``factorized``: safetensors hold ``<name>.down.weight [r, in]``, ``<name>.up.weight [out, r]`` (and
  ``up.bias``) plus every untouched weight; ``config.json`` records ``lowrank_ranks`` ({name: rank}) and an
  ``auto_map`` to ``modeling_lowrank.py``, a copy of :mod:`lowrank_core.modeling_lowrank` with the base
  architecture's transformers classes (from the arch table) filled in. A fused linear factorised by parts
  (a ``SlicedLinear``) is re-fused (parts' rows concatenated) in ``dense`` and kept as parts in ``factorized``
  (``lowrank_slices``: {name: [[part, rows], ...]} rebuilds it from the config).

:func:`export_student` writes into a temporary sibling folder, verifies it (:mod:`.verify`) and renames
it into place; any error (also Ctrl-C) removes it, and the error names the target. It first checks that
the target's disk has room for the weights and holds the target's writer lock (``tempdirs.writer_lock``)
throughout: a second writer of the same folder fails at once. The manifest lists every weight file
with its size and sha256 (``files``; loading refuses a folder that differs: :mod:`lowrank_core.weightfiles`).
Every export also holds ``lowrank.json`` (:mod:`.manifest`), ``README.md``, a Hugging Face model card, and
``recipe.yaml``, the job's recipe (:mod:`.card`).
The student shares tensors with the teacher: nothing is modified.
"""
from __future__ import annotations

import copy
import errno
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from ..arch import FACTORIZED_PREFIX, ArchSpec, UnsupportedArchitectureError, arch_of
from ..experts import stacked_tensors
from ..lowrank import low_rank_modules, ranks_of
from ..progress import Progress, ensure_progress
from ..rescue import USER_CAUSES, free_bytes, one_line
from ..sliced import sliced_modules
from ..tempdirs import lock_holder, mark_complete, temp_sibling, writer_lock
from ..weightfiles import weight_files
from .card import write_card
from .common import FORMATS, MODELING_FILE, ExportError, ExportWriteError, model_dtype
from .manifest import MANIFEST, complete_manifest, write_manifest
from .verify import ExportVerificationError, verify_export

MODELING_TEMPLATE = Path(__file__).resolve().parent.parent / MODELING_FILE
CONFIG_CLASS, MODEL_CLASS = "LowRankConfig", "LowRankForCausalLM"  # the classes of modeling_lowrank.py
MAX_SHARD_BYTES = 4 * 1024 ** 3
FACTOR_KEYS = (".down.weight", ".up.weight", ".up.bias")
RECORDS_BYTES = 16 * 1024 ** 2  # allowance for config, tokenizer, manifest and card beside the weights


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


def _tied_head(model: nn.Module) -> bool:
    return arch_of(model).tied(model.config)


# ----------------------------------------------------------------------------- tensors to write
def _factor_owner(key: str, low: dict) -> Optional[str]:
    """``<name>`` for a state-dict key ``<name>.down.weight`` / ``.up.weight`` / ``.up.bias`` of a low-rank module."""
    for suffix in FACTOR_KEYS:
        if key.endswith(suffix) and key[: -len(suffix)] in low:
            return key[: -len(suffix)]
    return None


def _merged_weight(mod: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``up @ down`` [out, in] of a low-rank module, multiplied in float32, returned in ``dtype``."""
    return (mod.up.weight.detach().float() @ mod.down.weight.detach().float()).to(dtype)


def _dense_tensors(model: nn.Module) -> dict[str, Callable[[], torch.Tensor]]:
    """{key: thunk} of the merged model's state dict; merged weights are computed only when written."""
    dtype = model_dtype(model)
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
    return stacked_tensors(model, _refused(out, sliced_modules(model)))  # MoE: transformers' stacked experts


def _refused(thunks: dict, sliced: dict) -> dict[str, Callable[[], torch.Tensor]]:
    """``thunks`` with each ``SlicedLinear``'s parts ``<name>.<part>.weight`` / ``.bias`` concatenated back
    into the fused ``<name>.weight`` / ``.bias`` (rows in layout order), standing where its first part stood."""
    out: dict[str, Callable[[], torch.Tensor]] = {}
    for key, thunk in thunks.items():
        owner, _, leaf = key.rpartition(".")
        name, _, part = owner.rpartition(".")
        if name not in sliced or part not in sliced[name].part_names:
            out[key] = thunk
        elif name + "." + leaf not in out:
            keys = [f"{name}.{p}.{leaf}" for p in sliced[name].part_names]
            out[name + "." + leaf] = (lambda ks=keys: torch.cat([thunks[k]() for k in ks], dim=0))
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
            if key == arch_of(model).head + ".weight" and _tied_head(model):
                continue
            raise ExportError(f"{key} shares its storage with {seen[ident]} but is not a tied lm_head; "
                              "cannot write it without duplicating it")
        seen[ident] = key
        out[key] = tensor
    return out


def _sizes(thunks: dict[str, Callable[[], torch.Tensor]], model: nn.Module) -> dict[str, int]:
    """Bytes of every tensor to write, without materialising merged weights."""
    dtype_size = torch.empty((), dtype=model_dtype(model)).element_size()
    low, sliced = low_rank_modules(model), sliced_modules(model)
    sizes = {}
    for key in thunks:
        name, _, leaf = key.rpartition(".")
        if name in sliced:  # a re-fused weight [out, in] or bias [out]
            mod = sliced[name]
            sizes[key] = mod.out_features * (mod.in_features if leaf == "weight" else 1) * dtype_size
        elif name in low and leaf == "weight":
            sizes[key] = low[name].up.weight.shape[0] * low[name].down.weight.shape[1] * dtype_size
        elif name in low and leaf == "bias":
            sizes[key] = low[name].up.weight.shape[0] * dtype_size
        else:
            t = thunks[key]()
            sizes[key] = t.numel() * t.element_size()
    return sizes


def export_bytes(student: nn.Module, format: str) -> int:
    """Bytes a ``format`` export of ``student`` takes: its weights exactly, plus :data:`RECORDS_BYTES`."""
    thunks = _dense_tensors(student) if format == "dense" else _factorized_tensors(student)
    return sum(_sizes(thunks, student).values()) + RECORDS_BYTES


def check_room(target: Path, needed: int, format: str) -> None:
    """ExportWriteError naming ``target`` when its disk has fewer than ``needed`` bytes free."""
    free = free_bytes(Path(target).parent)
    if free < needed:
        raise ExportWriteError(f"export target {target}: its disk has {free:,} bytes free, the {format} export "
                               f"needs about {needed:,}; free space or choose another disk") \
            from OSError(errno.ENOSPC, f"{free:,} bytes free, about {needed:,} needed")


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
        tensors = {k: _owned(thunks[k]().detach().to("cpu").contiguous()) for k in keys}
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    if n > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {k: fname for keys, fname in zip(shards, names) for k in keys}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    progress(n, n, "weights written")
    return names


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a copy when it views part of a larger storage (a dense part of a ``SlicedLinear``: row views
    of one fused weight, which safetensors refuses as shared)."""
    return tensor if tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size() else tensor.clone()


# ----------------------------------------------------------------------------- configs and modeling file
def _dense_config(model: nn.Module):
    config = copy.deepcopy(model.config)
    spec = arch_of(model)
    if spec.head in low_rank_modules(model) and _tied_head(model):
        setattr(config, spec.tie_attr, False)  # the merged head is its own matrix now
    config.dtype = model_dtype(model)
    return config


def _factorized_arch(model: nn.Module) -> ArchSpec:
    try:
        return arch_of(model)
    except UnsupportedArchitectureError as e:
        raise ExportError(f"cannot write a factorized export: {e}") from None


def _factorized_config(model: nn.Module, spec: ArchSpec) -> dict:
    """The base config as a dict, plus model_type ``lowrank_<base>``, ``lowrank_ranks`` and ``auto_map``."""
    module = MODELING_FILE[:-3]
    d = model.config.to_dict()
    ranks = ranks_of(model)
    d.update(model_type=FACTORIZED_PREFIX + spec.model_type, architectures=[MODEL_CLASS],
             lowrank_base_model_type=spec.model_type, lowrank_ranks=ranks,
             dtype=str(model_dtype(model)).replace("torch.", ""),
             auto_map={"AutoConfig": f"{module}.{CONFIG_CLASS}", "AutoModelForCausalLM": f"{module}.{MODEL_CLASS}"})
    slices = {name: m.layout() for name, m in sliced_modules(model).items()}
    if slices:
        d["lowrank_slices"] = slices  # fused linears rebuilt as parts: {name: [[part, rows], ...]}
    if spec.head in ranks:
        d[spec.tie_attr] = False  # the factorised head is its own matrix
    return d


def modeling_source(spec: ArchSpec) -> str:
    """The text of ``modeling_lowrank.py`` for ``spec``: its three ``BASE_*`` lines set from the arch table."""
    text = MODELING_TEMPLATE.read_text()
    for name, value in (("BASE_MODEL_TYPE", spec.model_type), ("BASE_CONFIG_CLASS", spec.hf_config),
                        ("BASE_MODEL_CLASS", spec.hf_model)):
        text, found = re.subn(rf'^{name} = "[^"\n]*"$', f"{name} = {json.dumps(value)}", text, flags=re.M)
        if found != 1:
            raise ExportError(f'{MODELING_TEMPLATE} must have exactly one line `{name} = "..."`; found {found}')
    return text


def write_export(student: nn.Module, tokenizer, folder: Path, format: str,
                 max_shard_bytes: int = MAX_SHARD_BYTES, progress: Optional[Progress] = None) -> None:
    """Write weights, config, generation config, tokenizer (and the modeling file) into ``folder``."""
    if format == "dense":
        config, thunks = _dense_config(student), _dense_tensors(student)
    else:  # the config and modeling file first: an unsupported model fails before any weight is written
        spec = _factorized_arch(student)
        config, modeling = _factorized_config(student, spec), modeling_source(spec)
        thunks = _factorized_tensors(student)
    write_safetensors(thunks, _sizes(thunks, student), folder, max_shard_bytes, progress)
    if format == "dense":
        config.save_pretrained(folder)
    else:
        (folder / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        (folder / MODELING_FILE).write_text(modeling)
    generation = getattr(student, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    _strip_foreign_code(folder, format)


def _strip_foreign_code(folder: Path, format: str) -> None:
    """No export may point at code of the source model: drop every ``auto_map`` but the factorized config's
    own (which names only our modeling file) and every Python file but that modeling file."""
    for name in ("tokenizer_config.json", "processor_config.json", "preprocessor_config.json") + \
            (("config.json",) if format == "dense" else ()):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            if isinstance(data, dict) and data.pop("auto_map", None) is not None:
                path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    for code in folder.glob("*.py"):
        if format == "dense" or code.name != MODELING_FILE:
            code.unlink()


# ----------------------------------------------------------------------------- safe writing
def check_target(target: Path, force: bool) -> None:
    """Raise ExportError if ``target`` exists and may not (or must not) be replaced."""
    target = Path(target).expanduser().absolute()
    holder = lock_holder(target)
    if holder is not None:
        raise ExportError(f"export target {target} is being written by {holder} right now; wait for it to finish "
                          "or choose another folder")
    check_replaceable(target, force)


def check_replaceable(target: Path, force: bool) -> None:
    """:func:`check_target` without the writer lock (its holder's own check before the move)."""
    if not target.exists():
        return
    if not force:
        raise ExportError(f"export target {target} already exists; choose another folder or force overwrite (--force)")
    if not target.is_dir():
        raise ExportError(f"export target {target} exists and is not a folder; refusing to replace it")
    if any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise ExportError(f"refusing to overwrite {target}: it is not empty and not a lowrank export (no {MANIFEST})")


def _temp_sibling(target: Path, tag: str) -> Path:
    # mkdtemp makes 0700; an export folder gets ordinary permissions
    return temp_sibling(target, tag, mode=0o777 & ~_umask())


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
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
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


def _write_records(folder: Path, manifest: dict) -> None:
    """``lowrank.json``, ``README.md`` (the model card) and ``recipe.yaml`` of ``manifest``."""
    write_manifest(folder, manifest)
    write_card(folder, manifest)


def export_student(student: nn.Module, tokenizer, target_dir: Union[str, Path], format: str = "dense",
                   manifest: Optional[dict] = None, force: bool = False, verify: bool = True, probe=None,
                   eval_examples=None, tolerance: Optional[float] = None,
                   max_shard_bytes: int = MAX_SHARD_BYTES, progress: Optional[Progress] = None) -> ExportResult:
    """Write ``student`` to ``target_dir`` as a ``dense`` or ``factorized`` export and verify it.

    ``manifest``: the caller's part of ``lowrank.json`` (see :func:`.manifest.build_manifest`; it may hold
    ``comparison`` and ``command``); ranks, parameters, tool version, creation time and the verification
    result are added here, and ``README.md`` (:mod:`.card`) and ``recipe.yaml`` are written from it. ``probe``: texts
    or input ids [B, T] for the logit comparison (default: two short chat prompts). ``eval_examples``:
    examples whose answer loss is computed on the reloaded export and on the student. Raises ExportError
    for a bad format, an unsupported model (factorized) or an existing target without ``force``;
    ExportVerificationError when the reload differs; ExportWriteError, naming the target, when another
    writer holds it, its disk lacks room or writing fails (a bug keeps its type, the target in a note).
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; allowed: {', '.join(FORMATS)}")
    target = Path(target_dir).expanduser().absolute()
    check_target(target, force)
    try:
        with writer_lock(target, "export target"):
            return _write_verified(student, tokenizer, target, format, manifest, force, verify, probe, eval_examples,
                                   tolerance, max_shard_bytes, ensure_progress(progress))
    except (ExportVerificationError, ExportWriteError):
        raise
    except Exception as e:  # noqa: BLE001 - every failure names the target
        text = f"writing the {format} export to {target} failed: {one_line(e)}"
        if not isinstance(e, USER_CAUSES):
            e.add_note(text)
            raise
        raise ExportWriteError(text) from e


def _write_verified(student, tokenizer, target: Path, format: str, manifest, force: bool, verify: bool, probe,
                    eval_examples, tolerance, max_shard_bytes: int, progress: Progress) -> ExportResult:
    """:func:`export_student`'s work, under the target's writer lock."""
    check_room(target, export_bytes(student, format), format)
    t0 = time.perf_counter()
    tmp = _temp_sibling(target, "tmp")
    try:
        full = complete_manifest(manifest, student, format)
        write_export(student, tokenizer, tmp, format, max_shard_bytes, progress)
        full["files"] = weight_files(tmp)
        _write_records(tmp, full)
        t_write = time.perf_counter() - t0
        check = {"max_logit_diff": None, "tolerance": None, "reload_loss": None, "student_loss": None}
        if verify:
            check = verify_export(student, tokenizer, tmp, format, probe, eval_examples, tolerance, progress)
            full["verification"] = check
            _write_records(tmp, full)
        t_verify = time.perf_counter() - t0 - t_write
        _ordinary_permissions(tmp)
        mark_complete(tmp)
        check_replaceable(target, force)  # the target may have appeared meanwhile
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(path=str(target), format=format, bytes_on_disk=_folder_bytes(target),
                        weight_bytes=_folder_bytes(target, ".safetensors"),
                        parameters=full["parameters"]["stored"], ranks=full["ranks"], verified=bool(verify), **check,
                        seconds={"write": t_write, "verify": t_verify, "total": time.perf_counter() - t0})
