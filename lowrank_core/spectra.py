"""Singular-value spectra of linears: of the weight, and activation-aware (of ``W·L``, ``L Lᵀ = G``).

Energy is the cumulative fraction of squared singular values: for the activation-aware spectrum,
``1 − energy[r−1]`` is exactly the relative output error of the best rank-r factorisation on the
calibration tokens. Spectra are cached on disk under
``cache_dir()/spectra/<model fingerprint>/<linear name>.<weight | aware-<gram id>>.npz`` (no pickle), so a
second look is instant; ``gram_id`` names the calibration (e.g. a split fingerprint), and the Gram
itself may be passed lazily as a callable so a cache hit skips calibration altogether; ``cached_spectrum``
only looks. ``plan_for_energy`` turns the ranks needed for an energy (the heatmap) into a compact plan.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
from torch import nn

from .allocate.path import plan_from_ranks
from .linears import LinearInfo, weight_of
from .decompose import weight_singular_values, whitened_singular_values, whitening
from .models import cache_dir, model_fingerprint
from .plan import Plan
from .progress import Progress, ensure_progress

KINDS = ("weight", "aware")
ENERGY_LEVELS = (0.9, 0.95, 0.99)
_TOL = 1e-12


@dataclass
class Spectrum:
    """Singular values (descending, float64) of one linear ``out_features x in_features``."""

    name: str
    weight_sv: np.ndarray
    aware_sv: Optional[np.ndarray]
    break_even_rank: int
    max_rank: int
    layer: Optional[int] = None
    module: str = ""
    out_features: int = 0
    in_features: int = 0
    gram_id: Optional[str] = None
    expert: Optional[int] = None     # expert index of a mixture-of-experts linear

    @property
    def column(self) -> str:
        """The heatmap's column: the module, or one expert's (``experts.5.down_proj``)."""
        return self.module if self.expert is None else f"experts.{self.expert}.{self.module}"

    def values(self, kind: str = "weight") -> np.ndarray:
        if kind not in KINDS:
            raise ValueError(f"unknown spectrum kind {kind!r}; allowed: {', '.join(KINDS)}")
        if kind == "aware" and self.aware_sv is None:
            raise ValueError(f"{self.name} has no activation-aware spectrum (no calibration Gram was given)")
        return self.weight_sv if kind == "weight" else self.aware_sv

    def energy(self, kind: str = "weight") -> np.ndarray:
        """Cumulative energy ``Σ_{i<=k} s_i² / Σ s_i²`` for k = 1..max_rank (all ones for a zero spectrum)."""
        sq = np.square(self.values(kind))
        total = sq.sum()
        return np.cumsum(sq) / total if total > 0 else np.ones_like(sq)

    def rank_for_energy(self, fraction: float, kind: str = "weight") -> int:
        """Smallest rank whose factors keep at least ``fraction`` (0 < fraction <= 1) of the energy."""
        if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"energy fraction {fraction!r} is not allowed; use a number in (0, 1]")
        e = self.energy(kind)
        return int(min(len(e), np.searchsorted(e, fraction - _TOL) + 1))

    def energy_ranks(self, levels: Iterable[float] = ENERGY_LEVELS) -> dict:
        """``{kind: {"0.9": rank, ...}}`` for each spectrum present."""
        kinds = KINDS if self.aware_sv is not None else ("weight",)
        return {k: {f"{lv:g}": self.rank_for_energy(lv, k) for lv in levels} for k in kinds}

    def to_dict(self) -> dict:
        """JSON-friendly: metadata, singular values as lists, ranks for 90/95/99% energy."""
        return {"name": self.name, "layer": self.layer, "module": self.module,
                "shape": [self.out_features, self.in_features], "break_even_rank": self.break_even_rank,
                "max_rank": self.max_rank, "gram_id": self.gram_id,
                "weight_sv": self.weight_sv.tolist(),
                "aware_sv": None if self.aware_sv is None else self.aware_sv.tolist(),
                "energy_ranks": self.energy_ranks()}

    def rows(self) -> list[dict]:
        """One row per rank k = 1..max_rank: singular values and cumulative energy of each kind (for plots)."""
        kinds = KINDS if self.aware_sv is not None else ("weight",)
        cols = {k: (self.values(k), self.energy(k)) for k in kinds}
        return [{"rank": i + 1, **{f"{k}_sv": float(sv[i]) for k, (sv, _) in cols.items()},
                 **{f"{k}_energy": float(e[i]) for k, (_, e) in cols.items()}} for i in range(self.max_rank)]


# ----------------------------------------------------------------------------- computing
def gram_digest(gram) -> str:
    """Short hash of a Gram (tensor, ``GramStats`` or ``Whitening``) for cache keys."""
    if hasattr(gram, "fingerprint"):
        return gram.fingerprint()
    g = getattr(gram, "gram", gram)  # Whitening / tensor
    return hashlib.blake2b(g.detach().cpu().contiguous().numpy().tobytes(), digest_size=8).hexdigest()


def compute_spectrum(model: nn.Module, info: LinearInfo, gram=None, gram_id: Optional[str] = None) -> Spectrum:
    """Spectrum of ``info``'s weight and, with ``gram`` [in, in], its activation-aware spectrum (no cache)."""
    W = _weight(model, info)
    aware = None if gram is None else whitened_singular_values(W, gram).cpu().numpy()
    return Spectrum(name=info.name, weight_sv=weight_singular_values(W).cpu().numpy(), aware_sv=aware,
                    break_even_rank=info.break_even_rank, max_rank=info.max_rank, layer=info.layer,
                    module=info.module, out_features=info.out_features, in_features=info.in_features,
                    gram_id=gram_id if gram is not None else None, expert=info.expert)


def _weight(model: nn.Module, info: LinearInfo) -> torch.Tensor:
    """The weight [out, in] of ``info`` (a part of a fused linear: its rows)."""
    try:
        module = model.get_submodule(info.path)
    except AttributeError:
        raise ValueError(f"the model has no linear named {info.path!r}") from None
    if getattr(module, "weight", None) is None:
        raise ValueError(f"{info.name} has no dense weight (already factorised?); spectra need an nn.Linear")
    return weight_of(model, info)[0]


# ----------------------------------------------------------------------------- disk cache
def spectra_dir(fingerprint: str) -> Path:
    return cache_dir() / "spectra" / fingerprint


def _cache_path(fingerprint: str, name: str, gram_id: Optional[str]) -> Path:
    tag = "weight" if gram_id is None else "aware-" + re.sub(r"[^A-Za-z0-9_.-]", "_", gram_id)
    return spectra_dir(fingerprint) / f"{name}.{tag}.npz"


def save_spectrum(spectrum: Spectrum, path: Path) -> None:
    meta = {k: getattr(spectrum, k) for k in ("name", "break_even_rank", "max_rank", "layer", "module",
                                              "out_features", "in_features", "gram_id", "expert")}
    arrays = {"weight_sv": spectrum.weight_sv, "meta": np.array(json.dumps(meta))}
    if spectrum.aware_sv is not None:
        arrays["aware_sv"] = spectrum.aware_sv
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp.npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_spectrum(path: Path) -> Spectrum:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        aware = np.array(data["aware_sv"]) if "aware_sv" in data.files else None
        return Spectrum(weight_sv=np.array(data["weight_sv"]), aware_sv=aware, **meta)


def linear_spectrum(model: nn.Module, info: LinearInfo, gram: Any = None, fingerprint: Optional[str] = None,
                    cache: bool = True, gram_id: Optional[str] = None) -> Spectrum:
    """Spectrum of one linear, cached on disk per model ``fingerprint`` and Gram.

    ``gram``: None (weight spectrum only), a Gram tensor / ``GramStats`` / ``Whitening``, or a zero-argument
    callable returning one (called only on a cache miss). ``gram_id`` keys the cache entry (default: a
    hash of the Gram; required with a callable). ``fingerprint`` defaults to ``model_fingerprint(model)``.
    """
    lazy = callable(gram) and not isinstance(gram, torch.Tensor)
    if lazy and gram_id is None:
        raise ValueError("a lazily computed gram (callable) needs gram_id=... to key the spectrum cache")
    if gram is not None and gram_id is None:
        gram_id = gram_digest(gram)
    if gram is None:
        gram_id = None
    if not cache:
        return compute_spectrum(model, info, gram() if lazy else gram, gram_id)
    if fingerprint is None:
        fingerprint = model_fingerprint(model)
    found = cached_spectrum(info, fingerprint, gram_id)
    if found is not None:
        return found
    spectrum = compute_spectrum(model, info, gram() if lazy else gram, gram_id)
    try:
        save_spectrum(spectrum, _cache_path(fingerprint, info.name, gram_id))
    except OSError:  # a cache that cannot be written (read-only LOWRANK_CACHE, full disk): the spectrum stands
        pass
    return spectrum


def cached_spectrum(info: LinearInfo, fingerprint: str, gram_id: Optional[str] = None) -> Optional[Spectrum]:
    """The disk-cached spectrum of ``info`` (weight only with ``gram_id=None``), or None on a miss or a
    damaged entry (which the next :func:`linear_spectrum` recomputes and rewrites): looks, never computes."""
    path = _cache_path(fingerprint, info.name, gram_id)
    if not path.is_file():
        return None
    try:
        return load_spectrum(path)
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
        return None


def model_spectra(model: nn.Module, linears: list[LinearInfo], grams: Optional[dict] = None,
                  fingerprint: Optional[str] = None, cache: bool = True, gram_id: Optional[str] = None,
                  progress: Optional[Progress] = None) -> list[Spectrum]:
    """Spectra of many linears; ``grams`` maps ``gram_key`` -> Gram (missing keys: weight spectrum only).

    ``gram_id`` (e.g. a calibration split fingerprint) is suffixed with each linear's gram key.
    """
    progress = ensure_progress(progress)
    if cache and fingerprint is None:
        fingerprint = model_fingerprint(model)
    prepared: dict = {}
    out = []
    for done, info in enumerate(linears, 1):
        gram = None if grams is None else grams.get(info.gram_key)
        if gram is not None:
            if info.gram_key not in prepared:
                prepared[info.gram_key] = whitening(gram, device=_weight(model, info).device)
            gram = prepared[info.gram_key]
        key = None if gram is None or gram_id is None else f"{gram_id}-{info.gram_key}"
        out.append(linear_spectrum(model, info, gram, fingerprint=fingerprint, cache=cache, gram_id=key))
        progress(done, len(linears), info.name)
    return out


def energy_rank_table(spectra: Iterable[Spectrum], fraction: float = 0.9, kind: str = "weight") -> list[dict]:
    """Rows (name, layer, module, column, rank, max_rank, break_even_rank, rank_fraction, saves) for a
    heatmap: the rank needed to keep ``fraction`` of each linear's ``kind`` energy (pivot layer x column on
    ``rank``; the column is the module, or one expert's module)."""
    rows = []
    for s in spectra:
        r = s.rank_for_energy(fraction, kind)
        rows.append({"name": s.name, "layer": s.layer, "module": s.module, "column": s.column, "rank": r,
                     "max_rank": s.max_rank,
                     "break_even_rank": s.break_even_rank, "rank_fraction": r / s.max_rank,
                     "saves": r < s.break_even_rank})
    return rows


def plan_for_energy(spectra: Iterable[Spectrum], fraction: float, kind: str, infos: Iterable[LinearInfo],
                    method: Optional[str] = None, saving_only: bool = False) -> Plan:
    """The plan giving each decoder matrix of ``spectra`` the rank that keeps ``fraction`` of its ``kind``
    energy (the heatmap's ranks; one rule per module and rank, layers grouped). ``method`` defaults to the
    one whose error that energy measures: ``whitened`` for the activation-aware spectrum, ``svd`` for the
    weight's. ``saving_only`` leaves matrices whose rank is not below break-even dense."""
    rows = [r for r in energy_rank_table(spectra, fraction, kind) if r["layer"] is not None]
    ranks = {r["name"]: r["rank"] for r in rows if r["saves"] or not saving_only}
    if not ranks:
        raise ValueError(f"no matrix reaches {fraction:.1%} of its {kind} energy below its break-even rank; "
                         "allowed: saving_only=False (keep every matrix at its rank)")
    return plan_from_ranks(ranks, list(infos), method or ("whitened" if kind == "aware" else "svd"))


def spectrum_label(spectrum: Spectrum, kind: str) -> str:
    """``"L17 activation-aware"`` / ``"lm_head weight"``: the legend name of one curve."""
    where = "lm_head" if spectrum.layer is None else f"L{spectrum.layer}"
    return f"{where} {'activation-aware' if kind == 'aware' else 'weight'}"


def spectrum_curves(spectra: Iterable[Spectrum], kinds: Iterable[str]) -> tuple[dict, dict]:
    """({label: singular values / the largest}, {label: cumulative energy}) for each spectrum and kind."""
    curves, energies = {}, {}
    for sp in spectra:
        for kind in kinds:
            values = sp.values(kind)
            curves[spectrum_label(sp, kind)] = (values / values[0]).tolist() if values[0] > 0 else values.tolist()
            energies[spectrum_label(sp, kind)] = sp.energy(kind).tolist()
    return curves, energies


def spectrum_rows(spectra: Iterable[Spectrum], rank: int, kinds: Iterable[str],
                  levels: Iterable[float] = ENERGY_LEVELS) -> list[dict]:
    """One row per spectrum and kind: energy kept at ``rank`` (capped at each matrix's max rank), the
    relative output error it implies (activation-aware only: exact on the calibration tokens), the rank
    needed for each energy level, break-even and max rank."""
    rows = []
    for sp in spectra:
        for kind in kinds:
            kept = float(sp.energy(kind)[min(int(rank), sp.max_rank) - 1])
            rows.append({"matrix": sp.name, "spectrum": kind, "energy kept at rank": kept,
                         "rel. output error at rank": (1 - kept) if kind == "aware" else None,
                         **{f"rank for {lv:.0%}": sp.rank_for_energy(lv, kind) for lv in levels},
                         "break-even rank": sp.break_even_rank, "max rank": sp.max_rank})
    return rows
