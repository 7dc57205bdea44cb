"""The teacher cache: per-example teacher next-token targets on disk, shared by comparison and healing.

A comparison (scope ``answer``: positions predicting answer tokens) and healing's KL (scope ``real``:
every real token) need the same thing from the teacher at each scored position: its top-``k``
log-probabilities with their token ids, the log of the tail mass left outside them, its argmax, and (for
``answer``) the row's Σ CE of the answer tokens. Those are stored once and reused by every later run:
a comparison of any student on the same examples, every healing run and every verification of a search
with healing in the loop.

KL(p ‖ q) is then the lumped-tail KL over the partition {top-k tokens, tail} (:func:`lumped_kl`):
Σ_topk p log(p/q) + p_tail log(p_tail/q_tail). By the log-sum inequality it never exceeds the full
KL, and falls short of it by p_tail · KL(p̃_tail ‖ q̃_tail) (tails renormalised), at most
:func:`kl_gap_bound` per token; exact when k ≥ vocab. Σ CE and top-1 are exact.

Layout (``root`` = ``models.cache_dir() / "teacher"`` for ``auto``)::

    root/v<FORMAT>/<namespace>/namespace.json        the key parts in clear (for people)
    root/v<FORMAT>/<namespace>/shard-<hex>/entries.json      {"format", "key", "rows": {row: {"n", "ce"}}}
    root/v<FORMAT>/<namespace>/shard-<hex>/targets.safetensors  <row>.idx [n,k] int32, <row>.logp [n,k] f32,
                                                          <row>.tail [n] f32, <row>.top1 [n] int32

namespace = sha256 of {format, model fingerprint, dtype, scope, max_len, k, bf16}; row = sha256 of the
row's token ids and labels (the example's content at that length, through the tokenizer). A changed
part is another namespace or row: a miss. A shard is written in a temp sibling and renamed into place
(``tempdirs``); one whose ``format`` differs from :data:`FORMAT`, or still marked incomplete, is ignored.
Clear the cache by deleting ``root``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .models import cache_dir, model_fingerprint
from .tempdirs import INCOMPLETE, mark_complete, stale_siblings, temp_sibling

FORMAT = 1          # on-disk format version: entries of another version are ignored
TOP_K = 64          # teacher log-probabilities kept per position
SCOPES = ("answer", "real")
FLUSH_ROWS = 256    # rows held in memory before a shard is written


@dataclass
class Targets:
    """The teacher at ``n`` positions: ``idx`` / ``logp`` [n, k] (top-k ids, log-probabilities, sorted),
    ``tail`` [n] (log of the mass outside them; -inf when k covers the vocabulary), ``top1`` [n]
    (argmax), ``ce``: Σ CE over the row's answer tokens (nats; NaN for scope ``real``)."""

    idx: torch.Tensor
    logp: torch.Tensor
    tail: torch.Tensor
    top1: torch.Tensor
    ce: float = math.nan

    @property
    def n(self) -> int:
        return int(self.tail.shape[0])

    def to(self, device) -> "Targets":
        return Targets(self.idx.to(device), self.logp.to(device), self.tail.to(device), self.top1.to(device), self.ce)


def cat_targets(parts: Sequence[Targets]) -> Targets:
    """Rows' targets concatenated in order (positions row-major, as ``mask.nonzero()`` lists them)."""
    return Targets(torch.cat([p.idx for p in parts]), torch.cat([p.logp for p in parts]),
                   torch.cat([p.tail for p in parts]), torch.cat([p.top1 for p in parts]),
                   math.fsum(p.ce for p in parts))


def targets_from_logp(t_logp: torch.Tensor, k: int) -> Targets:
    """Targets of teacher log-probabilities ``t_logp`` [n, V] (float32): top-min(k, V) and the tail."""
    logp, idx = t_logp.topk(min(int(k), t_logp.shape[-1]), dim=-1)
    tail = t_logp.scatter(1, idx, -math.inf).logsumexp(dim=-1)
    return Targets(idx.long(), logp.float(), tail.float(), t_logp.argmax(dim=-1))


def _tail_of(s_logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log of the student's mass outside the teacher's top-k ids, [n]."""
    return s_logp.scatter(1, idx, -math.inf).logsumexp(dim=-1)


def lumped_kl(t: Targets, s_logp: torch.Tensor) -> torch.Tensor:
    """Per-token lumped-tail KL(teacher ‖ student) [n] from cached targets and student log-probabilities
    ``s_logp`` [n, V] (float32; differentiable w.r.t. it): ≤ the full-vocabulary KL (module doc)."""
    s_top = s_logp.gather(1, t.idx)
    top = (t.logp.exp() * (t.logp - s_top)).sum(dim=-1)
    p_tail = t.tail.exp()
    tail = torch.where(p_tail > 0, p_tail * (t.tail - _tail_of(s_logp, t.idx)), torch.zeros_like(p_tail))
    return top + tail


def kl_gap_bound(t: Targets, s_logp: torch.Tensor) -> torch.Tensor:
    """Per-token upper bound [n] on full KL − :func:`lumped_kl` = p_tail · KL(p̃ ‖ q̃) (renormalised tails):
    every tail p̃_i ≤ p_k / p_tail (p_k the k-th largest teacher probability), so
    KL(p̃ ‖ q̃) ≤ log(p_k / p_tail) + log q_tail − min_tail log q_i."""
    p_tail = t.tail.exp()
    masked = s_logp.scatter(1, t.idx, math.inf)
    min_q = masked.min(dim=-1).values
    bound = p_tail * ((t.logp[:, -1] - t.tail) + (_tail_of(s_logp, t.idx) - min_q)).clamp(min=0)
    return torch.where(p_tail > 0, bound, torch.zeros_like(bound))


def row_keys(batch: dict) -> list[str]:
    """Per row of a right-padded batch: sha256 (32 hex) of its real token ids and labels."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"].bool()
    out = []
    for r in range(ids.shape[0]):
        m = mask[r]
        h = hashlib.sha256(ids[r][m].to(torch.int64).cpu().numpy().tobytes())
        h.update(b"|" + labels[r][m].to(torch.int64).cpu().numpy().tobytes())
        out.append(h.hexdigest()[:32])
    return out


def split_rows(t: Targets, counts: Sequence[int], ces: Optional[Sequence[float]] = None) -> list[Targets]:
    """Targets of a batch's positions (row-major) split into per-row Targets (``counts[r]`` positions each)."""
    cut = [list(x.split(list(counts))) for x in (t.idx, t.logp, t.tail, t.top1)]
    return [Targets(*(c[r] for c in cut), ce=float(ces[r]) if ces is not None else math.nan)
            for r in range(len(counts))]


class Namespace:
    """The entries of one key (teacher, dtype, scope, max_len, k, bf16): ``get(row)``, ``put(row, targets)``;
    new rows are written as one shard per :data:`FLUSH_ROWS` and at :meth:`flush`."""

    def __init__(self, folder: Path, key: dict):
        self.folder, self.key, self.k = folder, key, int(key["k"])
        self.rows: dict[str, tuple[Path, dict]] = {}      # row -> (shard, {"n", "ce"})
        self.pending: dict[str, Targets] = {}
        self.hits = self.misses = 0
        self._open: dict[Path, object] = {}
        for shard in sorted(folder.glob("shard-*")) if folder.is_dir() else []:
            entries = _read_entries(shard, key)
            for row, meta in (entries or {}).items():
                self.rows[row] = (shard, meta)

    def get(self, row: str) -> Optional[Targets]:
        if row in self.pending:
            self.hits += 1
            return self.pending[row]
        found = self.rows.get(row)
        if found is None:
            self.misses += 1
            return None
        shard, meta = found
        try:
            f = self._open.get(shard)
            if f is None:
                from safetensors import safe_open
                f = self._open[shard] = safe_open(str(shard / "targets.safetensors"), framework="pt")
            t = Targets(f.get_tensor(f"{row}.idx").long(), f.get_tensor(f"{row}.logp"), f.get_tensor(f"{row}.tail"),
                        f.get_tensor(f"{row}.top1").long(), float(meta["ce"]) if meta.get("ce") is not None else math.nan)
        except Exception:   # a shard removed or damaged meanwhile: a miss, never a misread
            self.rows.pop(row, None)
            self.misses += 1
            return None
        if t.n != int(meta["n"]) or t.idx.shape[0] != t.n:
            self.misses += 1
            return None
        self.hits += 1
        return t

    def put(self, row: str, targets: Targets) -> None:
        self.pending[row] = Targets(targets.idx.cpu(), targets.logp.cpu(), targets.tail.cpu(), targets.top1.cpu(),
                                    targets.ce)
        if len(self.pending) >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        """Write the pending rows as one new shard (temp sibling, renamed into place)."""
        if not self.pending:
            return
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        _remove_stale(self.folder)
        info = self.folder / "namespace.json"
        if not info.exists():
            _write_text(info, json.dumps(self.key, indent=1, sort_keys=True))
        target = self.folder / f"shard-{uuid.uuid4().hex[:16]}"
        tmp = temp_sibling(target, "write")
        try:
            tensors, rows = {}, {}
            for row, t in self.pending.items():
                tensors.update({f"{row}.idx": t.idx.to(torch.int32).contiguous(), f"{row}.logp": t.logp.float().contiguous(),
                                f"{row}.tail": t.tail.float().contiguous(), f"{row}.top1": t.top1.to(torch.int32).contiguous()})
                rows[row] = {"n": t.n, "ce": None if math.isnan(t.ce) else t.ce}
            save_file(tensors, str(tmp / "targets.safetensors"))
            (tmp / "entries.json").write_text(json.dumps({"format": FORMAT, "key": self.key, "rows": rows}))
            mark_complete(tmp)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for row in rows:
            self.rows[row] = (target, rows[row])
        self.pending = {}


def _remove_stale(folder: Path) -> None:
    """Remove the temp shards of writers that were killed (``tempdirs.stale_siblings`` of each)."""
    for leftover in folder.glob(".shard-*"):
        target = folder / leftover.name[1:].split(".", 1)[0]
        for old in stale_siblings(target):
            shutil.rmtree(old, ignore_errors=True)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_entries(shard: Path, key: dict) -> Optional[dict]:
    """The rows of a finished shard of this format and key; None for anything else (ignored)."""
    if (shard / INCOMPLETE).exists() or not (shard / "targets.safetensors").is_file():
        return None
    try:
        entries = json.loads((shard / "entries.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entries, dict) or entries.get("format") != FORMAT or entries.get("key") != key:
        return None
    rows = entries.get("rows")
    return rows if isinstance(rows, dict) else None


class TeacherCache:
    """Teacher targets under ``root`` (see the module doc), ``k`` log-probabilities per position."""

    def __init__(self, root: Union[str, Path], k: int = TOP_K):
        if int(k) < 1:
            raise ValueError(f"teacher cache k {k!r} must be >= 1")
        self.root, self.k = Path(root), int(k)

    def key(self, teacher: nn.Module, scope: str, max_len: int, bf16: bool, batch_size: Optional[int] = None) -> dict:
        """The key parts of ``teacher``'s entries (fingerprint, dtype, scope, max_len, k, bf16, format), and what
        the last bits of a score depend on: device type, torch's thread count and the batch size (padded
        batches sum in another order), so a cached row is the row this run would compute."""
        if scope not in SCOPES:
            raise ValueError(f"unknown teacher-cache scope {scope!r}; allowed: {', '.join(SCOPES)}")
        dtype = next(teacher.parameters()).dtype
        return {"format": FORMAT, "fingerprint": model_fingerprint(teacher), "dtype": str(dtype).replace("torch.", ""),
                "scope": scope, "max_len": int(max_len), "k": self.k, "bf16": bool(bf16),
                "device": next(teacher.parameters()).device.type, "threads": torch.get_num_threads(),
                "batch_size": None if batch_size is None else int(batch_size)}

    def namespace(self, teacher: nn.Module, scope: str, max_len: int, bf16: bool = False,
                  batch_size: Optional[int] = None) -> Namespace:
        key = self.key(teacher, scope, max_len, bf16, batch_size)
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return Namespace(self.root / f"v{FORMAT}" / name, key)


def resolve_cache(spec: Optional[str], k: int = TOP_K) -> Optional[TeacherCache]:
    """``off`` / None / '' -> None, ``auto`` -> ``cache_dir()/teacher``, anything else a folder."""
    if spec is None or str(spec).strip().lower() in ("", "off", "none"):
        return None
    if str(spec).strip().lower() == "auto":
        return TeacherCache(cache_dir() / "teacher", k)
    return TeacherCache(Path(spec).expanduser(), k)


def check_cache_spec(spec: Optional[str], what: str = "teacher_cache") -> None:
    """ValueError for a folder that exists and is not a directory (before any long work)."""
    if spec is None or str(spec).strip().lower() in ("", "off", "none", "auto"):
        return
    if Path(spec).expanduser().exists() and not Path(spec).expanduser().is_dir():
        raise ValueError(f"{what} {spec!r} is not a folder; allowed: a folder, 'auto' or 'off'")


def batch_targets(ns: Namespace, batch: dict, positions: torch.Tensor, teacher_logp) -> tuple[Targets, list]:
    """(the batch's teacher targets at ``positions`` [B, T] (row-major), per-row targets): cached rows read,
    the others from ``teacher_logp()`` -> (log-probabilities [n, V] at every position, per-row Σ CE or None)
    — called at most once, only on a miss — and stored."""
    keys = row_keys(batch)
    found = [ns.get(row) for row in keys]
    if any(t is None for t in found):
        logp, ces = teacher_logp()
        fresh = split_rows(targets_from_logp(logp, ns.k), positions.sum(dim=1).tolist(), ces)
        for r, row in enumerate(keys):
            if found[r] is None:
                ns.put(row, fresh[r])
                found[r] = fresh[r]
    return cat_targets(found), found
