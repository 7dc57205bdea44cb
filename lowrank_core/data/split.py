"""The honest calib / val / eval split of a source, fit / held-out splits, and calibration names.

``example_side(example, seed)`` decides each example's side from a sha256 of ``seed`` and the
example's content (``Example.key()``), never from its position, so calibration and evaluation data
are disjoint by construction and an example keeps its side whatever order, subset or source file it
arrives in. A uniform u in [0, 1) from the hash: u < eval_fraction (default 0.5) -> 'eval'; of the
rest, the first val_fraction (default 0.25) -> 'val', the remainder -> 'calib'.

``make_split`` streams a source until each side holds its requested count (a ``Split`` of three
lists of ``Example``); its ``SplitInfo`` records source, seed, fractions, counts and fingerprints
(16-hex sha256 prefixes over the ordered example keys: one per side, and one over the three), and the
records read that gave no example, counted by reason (``dropped``: ``{"duplicate": 12, "missing question": 3}``).

``split_examples`` is a different, positional split: a seeded fit / held-out split of a list of
calibration examples (held-out errors, refit early stopping).

``calibration_id(split, n, max_len)`` names the calibration behind a Gram or an activation-aware
spectrum (the first ``n`` calib examples cut to ``max_len`` tokens): the CLI and the app key their
spectrum caches by it.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

from .sources import DataSourceError, Example, describe_dropped, examples_of, source_name

SIDES = ("calib", "val", "eval")


def _check_fractions(eval_fraction: float, val_fraction: float) -> None:
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction {eval_fraction!r} must be strictly between 0 and 1")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction {val_fraction!r} must be in [0, 1)")


def example_side(example: Example, seed: int = 0, eval_fraction: float = 0.5, val_fraction: float = 0.25) -> str:
    """'calib', 'val' or 'eval' for ``example``, from a sha256 of ``seed`` and the example's key.

    A uniform u in [0, 1) is drawn from the hash: u < eval_fraction -> eval; the rest is the non-eval
    side, of which the first ``val_fraction`` is val and the remainder calib. Changing ``val_fraction``
    never moves an example into or out of eval.
    """
    _check_fractions(eval_fraction, val_fraction)
    digest = hashlib.sha256(f"lowrank-split:{int(seed)}:{example.key()}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0 ** 64
    if u < eval_fraction:
        return "eval"
    v = (u - eval_fraction) / (1.0 - eval_fraction)
    return "val" if v < val_fraction else "calib"


def iter_side(source="default", side: str = "eval", seed: int = 0, eval_fraction: float = 0.5,
              val_fraction: float = 0.25, dropped: Optional[dict] = None) -> Iterator[Example]:
    """Examples of one side ('calib', 'val', 'eval', or 'all' = no filter), lazily, in source order.

    ``source`` is a source name (see ``iter_examples``) or an iterable of ``Example``; ``dropped`` counts
    the records read that gave no example, by reason (all sides).
    """
    if side not in SIDES + ("all",):
        raise ValueError(f"unknown split side {side!r}; allowed: {', '.join(SIDES + ('all',))}")
    _check_fractions(eval_fraction, val_fraction)
    examples = examples_of(source, dropped)
    if side == "all":
        return examples
    return (ex for ex in examples if example_side(ex, seed, eval_fraction, val_fraction) == side)


def keys_fingerprint(keys: Iterable[str]) -> str:
    """Short sha256 (16 hex) over an ordered sequence of example keys."""
    h = hashlib.sha256()
    for key in keys:
        h.update(key.encode("ascii") + b"\n")
    return h.hexdigest()[:16]


@dataclass
class SplitInfo:
    """What a split is: enough to reproduce it and to check that two runs used the same data."""
    source: str
    seed: int
    eval_fraction: float
    val_fraction: float
    counts: dict            # {"calib": int, "val": int, "eval": int}
    fingerprint: str        # sha256 (16 hex) over the per-side fingerprints
    fingerprints: dict = field(default_factory=dict)  # per side: keys_fingerprint of its ordered keys
    dropped: dict = field(default_factory=dict)  # records read that gave no example, by reason (``sources``)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Split:
    calib: list
    val: list
    eval: list
    info: SplitInfo

    def side(self, name: str) -> list:
        if name not in SIDES:
            raise ValueError(f"unknown split side {name!r}; allowed: {', '.join(SIDES)}")
        return getattr(self, name)


def make_split(source="default", n_calib: int = 64, n_eval: int = 200, n_val: int = 0, seed: int = 0,
               eval_fraction: float = 0.5, val_fraction: float = 0.25) -> Split:
    """Stream ``source`` until each side holds its requested count; sides are disjoint by construction.

    Each side keeps the first examples (in source order) that ``example_side`` assigns to it, so
    ``make_split(...).eval`` equals the first ``n_eval`` of ``iter_side(source, 'eval', seed)``.
    """
    wanted = {"calib": int(n_calib), "val": int(n_val), "eval": int(n_eval)}
    bad = {k: v for k, v in wanted.items() if v < 0}
    if bad:
        raise ValueError(f"split counts must be >= 0, got {bad}")
    if wanted["val"] and val_fraction == 0:
        raise ValueError(f"n_val={n_val} needs val_fraction > 0")
    _check_fractions(eval_fraction, val_fraction)
    sides: dict[str, list] = {k: [] for k in SIDES}
    seen, dropped = 0, {}
    if any(wanted.values()):
        for ex in examples_of(source, dropped):
            seen += 1
            side = example_side(ex, seed, eval_fraction, val_fraction)
            if len(sides[side]) < wanted[side]:
                sides[side].append(ex)
                if all(len(sides[k]) >= wanted[k] for k in SIDES):
                    break
        else:
            got = {k: f"{len(sides[k])}/{wanted[k]}" for k in SIDES}
            lost = describe_dropped(dropped)
            raise DataSourceError(f"data source {source_name(source)!r} ran out after {seen} examples"
                                  f"{f' ({lost})' if lost else ''} before the split was full: got {got} "
                                  "(calib/val/eval); ask for fewer examples or use a larger source")
    per_side = {k: keys_fingerprint(ex.key() for ex in sides[k]) for k in SIDES}
    info = SplitInfo(source=source_name(source), seed=int(seed), eval_fraction=float(eval_fraction),
                     val_fraction=float(val_fraction), counts={k: len(sides[k]) for k in SIDES},
                     fingerprint=keys_fingerprint(f"{k}:{per_side[k]}" for k in SIDES), fingerprints=per_side,
                     dropped=dict(sorted(dropped.items())))
    return Split(calib=sides["calib"], val=sides["val"], eval=sides["eval"], info=info)

# ----------------------------------------------------------------------------- fit / held-out
def split_examples(examples: Sequence, valid_fraction: float, seed: int = 0) -> tuple[list, list]:
    """(fit, held_out): a seeded split by example; held-out gets round(n * fraction), at least one
    example when the fraction is positive and n >= 2."""
    n = len(examples)
    held = 0 if valid_fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * valid_fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held_idx = set(order[:held])
    return ([e for i, e in enumerate(examples) if i not in held_idx],
            [e for i, e in enumerate(examples) if i in held_idx])


# ----------------------------------------------------------------------------- naming a calibration
def calibration_id(split: Split, n: int, max_len: int) -> str:
    """Names a calibration: the first ``n`` examples of ``split``'s calib side, each cut to its first
    ``max_len`` tokens (as ``encoding.calibration_batches`` builds them), e.g. ``'3f2a…-n16-len512'``.

    The name is the calib side's fingerprint (``split.info.fingerprints['calib']``) when ``n`` takes the
    whole side, else the fingerprint of its first ``n`` keys: the same first ``n`` examples get the same
    name whatever the split's ``n_calib`` (``make_split``'s calib side of a bigger ``n_calib`` starts with
    that of a smaller one). Gram and spectrum caches key on it (together with the model fingerprint).
    """
    n, calib = int(n), split.calib
    if not 0 <= n <= len(calib):
        raise ValueError(f"calibration of {n} examples asked of a split with {len(calib)} calib examples")
    fingerprint = split.info.fingerprints.get("calib") if n == len(calib) else None
    if fingerprint is None:
        fingerprint = keys_fingerprint(ex.key() for ex in calib[:n])
    return f"{fingerprint}-n{n}-len{int(max_len)}"
