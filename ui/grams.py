"""Calibration Grams for the Spectra page: one forward pass per request, kept in a small in-memory cache."""
from __future__ import annotations

from lowrank_core.calibrate import collect_grams
from lowrank_core.data import calibration_batches, calibration_id

from ui import cache
from ui.progress import run_with_status
from ui.state import Settings

MAX_GRAMS = 16  # in-memory Grams (an in x in float64 each)


def gram_id(split, s: Settings, n: int) -> str:
    """Names the calibration behind an activation-aware spectrum (the first ``n`` calib examples, cut to
    ``s.max_len`` tokens): ``data.calibration_id``, the name the ``spectrum`` command uses too."""
    return calibration_id(split, n, s.max_len)


def grams_for(lm, split, s: Settings, n: int, infos: list, keep: bool = True) -> dict:
    """``{gram_key: GramStats}`` of ``infos`` on the first ``n`` calibration examples; only the keys not yet
    in memory are collected (one forward pass, stopped after the last needed layer)."""
    gid = gram_id(split, s, n)
    key = lambda gk: (lm.fingerprint, gid, gk)  # noqa: E731
    found = {i.gram_key: cache.cached("gram", key(i.gram_key)) for i in infos}
    missing = [i for i in infos if found[i.gram_key] is None]
    if missing:
        batches = calibration_batches(lm.tokenizer, split.calib[:n], batch_size=4, max_len=s.max_len)
        fresh = run_with_status(f"Calibrating on {n} examples ({len({i.gram_key for i in missing})} "
                                "input Grams)", lambda p: collect_grams(lm.model, batches, missing, progress=p))
        for gk, g in fresh.items():
            found[gk] = g
            if keep:
                cache.memo("gram", key(gk), lambda g=g: g, max_entries=MAX_GRAMS)
    return found
