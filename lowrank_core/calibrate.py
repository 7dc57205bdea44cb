"""Calibration statistics: input Gram matrices ``G = Σ_tokens x xᵀ`` of the linears to compress.

``collect_grams`` forwards the model over calibration batches once, with a forward pre-hook on one
representative linear per Gram key (q/k/v read one input, gate/up another: see
``LinearInfo.gram_key``). Padding positions are dropped through the batch's ``attention_mask``. Each
batch's product is computed in float32 (``xᵀx`` of that batch's real tokens) and added to a float64
accumulator, so memory is one ``in x in`` float64 matrix per key, independent of the number of examples.
The forward stops right after the last hooked linear has read its input (the rest of the model, e.g. a
49k-vocabulary ``lm_head``, is never computed unless the head itself is to be compressed). On CPU each
example of a right-padded batch is forwarded alone, cut to its length: the statistics are the same and
no FLOP is spent on padding (about a third of a batch of chat examples of mixed length).

``outputs=`` asks for the *output* covariance ``Σ y yᵀ`` of given linears instead (a forward hook,
key :func:`output_key`): for a matrix with ``out < in`` whose method only needs ``W G Wᵀ`` (``whitened``)
that is ``out²`` instead of ``in²`` products per token (:func:`cheaper_as_outputs`).

``precision`` is the dtype of the per-batch products (the sums are always float64): ``float32``
(default), ``float64`` (the reference), ``bfloat16`` (inputs rounded to bf16; on CUDA the product is
accumulated and returned in float32, elsewhere rounded to bf16 per batch). ``auto`` picks bfloat16 on
CUDA and float32 on CPU: on CPUs without bf16 matrix units (AVX2, as this project's machines) bf16
products are several times slower than float32, not faster (``bench/gram_precision.py``).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from .arch import arch_of
from .linears import LinearInfo
from .experts import RoutedMasks
from .progress import Progress, ensure_progress
from .student import private_view


@dataclass
class GramStats:
    """Sum of ``x xᵀ`` over ``tokens`` input vectors: ``gram`` [in, in] float64."""

    gram: Tensor
    tokens: int

    @classmethod
    def zeros(cls, in_features: int, device=None) -> "GramStats":
        return cls(torch.zeros(in_features, in_features, dtype=torch.float64, device=device), 0)

    @property
    def in_features(self) -> int:
        return int(self.gram.shape[0])

    def add_(self, x: Tensor, mask: Optional[Tensor] = None, precision: str = "float32") -> "GramStats":
        """Accumulate inputs ``x`` [..., in] in place; ``mask`` [...] (True/1 = real token) drops padding;
        ``precision``: dtype of the product (see the module docstring), the sum stays float64."""
        rows = _real_rows(x, mask, self.in_features)
        if rows.shape[0]:
            add_symmetric_product(self.gram, rows, product_dtype(precision, rows.device))
            self.tokens += int(rows.shape[0])
        return self

    def merge(self, other: "GramStats") -> "GramStats":
        """A new ``GramStats`` holding both sums (e.g. two calibration shards)."""
        if other.in_features != self.in_features:
            raise ValueError(f"cannot merge Grams of {self.in_features} and {other.in_features} input features")
        return GramStats(self.gram + other.gram.to(self.gram.device), self.tokens + other.tokens)

    def mean(self) -> Tensor:
        """Second moment ``G / tokens`` [in, in] float64 (zeros when no token was seen)."""
        return self.gram / max(self.tokens, 1)

    def fingerprint(self) -> str:
        """Short content hash of the sum and token count (for cache keys)."""
        h = hashlib.blake2b(self.gram.detach().cpu().contiguous().numpy().tobytes(), digest_size=8)
        h.update(str(self.tokens).encode())
        return h.hexdigest()


GRAM_BLOCK = 384  # column block of the symmetric product: ~35% fewer FLOPs than a full xᵀx at 1536 features


PRECISIONS = ("auto", "float32", "bfloat16", "float64")


def product_dtype(precision: str, device) -> torch.dtype:
    """The dtype of the per-batch Gram products for ``precision`` (one of :data:`PRECISIONS`) on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown Gram precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, precision)


def _product(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` with a float32 (or float64) result: bf16 inputs are accumulated in float32 where torch can
    (CUDA's ``out_dtype``), else their bf16 product is widened."""
    if a.dtype == torch.bfloat16:
        if a.is_cuda:
            return torch.mm(a, b, out_dtype=torch.float32)
        return (a @ b).float()
    return a @ b


def add_symmetric_product(acc: Tensor, rows: Tensor, dtype: torch.dtype = torch.float32) -> None:
    """``acc += rowsᵀ rows`` in place: ``acc`` [n, n] float64 (any device), ``rows`` [N, n] (one row per token,
    any dtype and device). Each product is computed in ``dtype`` (float32, float64 or bfloat16; see
    :func:`product_dtype`) on ``rows``' device, in column blocks of :data:`GRAM_BLOCK` covering the upper
    block triangle only (the lower one is mirrored), and added to ``acc`` in float64: a sum of ``x xᵀ`` over
    the rows, in the units of ``rows`` squared."""
    rows = rows.to(dtype)
    for i, j in _blocks(rows.shape[1]):
        part = _product(rows[:, i:j].T, rows[:, i:]).to(acc.device, torch.float64)   # [block, n - i]
        acc[i:j, i:] += part
        acc[j:, i:j] += part[:, j - i:].T


def _real_rows(x: Tensor, mask: Optional[Tensor], in_features: int) -> Tensor:
    if x.shape[-1] != in_features:
        raise ValueError(f"inputs have {x.shape[-1]} features, the Gram expects {in_features}")
    if mask is None:
        return x.reshape(-1, in_features)
    if tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match inputs {tuple(x.shape[:-1])} [..., in]")
    return x[mask.to(x.device).bool()]


def gram_representatives(linears: Iterable[LinearInfo]) -> dict[str, LinearInfo]:
    """``{gram_key: the first linear (in execution order) that reads that input}``."""
    reps: dict[str, LinearInfo] = {}
    for info in sorted(linears, key=lambda i: _execution_order(i, False)):
        reps.setdefault(info.gram_key, info)
    return reps


FLUSH_TOKENS = 8192  # tokens summed in a float32 partial before it is added to the float64 Gram


class GramAccumulator:
    """How :func:`collect_grams` sums (use it elsewhere to get the very same bits): the upper block
    triangle of ``Σ xᵀx`` summed in float32 by in-place ``addmm_`` (no product tensor is allocated per
    batch), added (mirrored) to a float64 :class:`GramStats` every :data:`FLUSH_TOKENS` tokens and by
    :meth:`flush`: float32 sums of at most that many tokens, as one big float32 matmul would make."""

    def __init__(self, stats: GramStats, dtype: torch.dtype):
        n = stats.in_features
        self.stats, self.dtype, self.tokens = stats, dtype, 0
        self.sum = torch.zeros(n, n, dtype=torch.float32, device=stats.gram.device)

    def add(self, x: Tensor, mask: Optional[Tensor]) -> None:
        rows = _real_rows(x, mask, self.stats.in_features).to(self.dtype)
        if not rows.shape[0]:
            return
        for i, j in _blocks(rows.shape[1]):
            if rows.dtype == torch.float32:
                self.sum[i:j, i:].addmm_(rows[:, i:j].T, rows[:, i:])
            else:  # bf16: a float32 product (CUDA) or a widened bf16 one
                self.sum[i:j, i:] += _product(rows[:, i:j].T, rows[:, i:]).float()
        self.stats.tokens += int(rows.shape[0])
        self.tokens += int(rows.shape[0])
        if self.tokens >= FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        if not self.tokens:
            return
        acc, part = self.stats.gram, self.sum.to(torch.float64)
        for i, j in _blocks(part.shape[0]):
            acc[i:j, i:] += part[i:j, i:]
            acc[j:, i:j] += part[i:j, j:].T
        self.sum.zero_()
        self.tokens = 0


def _blocks(n: int) -> list[tuple[int, int]]:
    return [(i, min(i + GRAM_BLOCK, n)) for i in range(0, n, GRAM_BLOCK)]


OUTPUT_SUFFIX = "@out"


def output_key(info: LinearInfo) -> str:
    """Key of a linear's output covariance in :func:`collect_grams`'s result."""
    return info.name + OUTPUT_SUFFIX


def cheaper_as_outputs(readers: Iterable[LinearInfo]) -> bool:
    """True when the output covariances of ``readers`` (linears sharing one input, each ``out <= in``)
    cost fewer products per token than their shared input Gram: ``Σ out² < in²`` (down_proj)."""
    readers = list(readers)
    return bool(readers) and all(i.out_features <= i.in_features for i in readers) and \
        sum(i.out_features ** 2 for i in readers) < readers[0].in_features ** 2


class _StopForward(Exception):
    """Raised by the last hook: every needed input has been seen, the rest of the forward is skipped."""


def _forward_target(model: nn.Module, reps: dict[str, LinearInfo]) -> nn.Module:
    """The decoder stack alone (the arch table's ``decoder``) unless an input of the head itself is needed."""
    spec = arch_of(model, strict=False)
    if spec is None or any(info.layer is None for info in reps.values()):
        return model
    return spec.decoder_of(model)


def pieces(input_ids: Tensor, mask: Tensor, unpad: bool):
    """(input_ids, mask) pairs to forward: the batch itself, or each right-padded row cut to its length."""
    if not unpad or bool(mask.all()):
        yield input_ids, mask
        return
    for row in range(input_ids.shape[0]):
        n = int(mask[row].sum())
        if n and bool(mask[row, :n].all()):
            yield input_ids[row:row + 1, :n], mask[row:row + 1, :n]
        elif n:  # not right-padded: keep the row whole, the mask still drops its padding
            yield input_ids[row:row + 1], mask[row:row + 1]


def _batch_total(batches, total: Optional[int]) -> int:
    if total is not None:
        return int(total)
    try:
        return len(batches)
    except TypeError:
        return 0


def _execution_order(info: LinearInfo, after: bool) -> tuple:
    """(layer, expert, position, after): a layer's experts run one after another, after its attention."""
    expert = -1 if info.expert is None else info.expert
    return (float("inf") if info.layer is None else info.layer, expert, info.position, after)


@torch.no_grad()
def collect_grams(model: nn.Module, batches: Iterable[dict], linears: list[LinearInfo],
                  progress: Optional[Progress] = None, total: Optional[int] = None,
                  unpad: Optional[bool] = None, outputs: Iterable[LinearInfo] = (),
                  precision: str = "float32") -> dict[str, GramStats]:
    """Input Grams of ``linears`` (and output covariances of ``outputs``) over ``batches`` (dicts with
    ``input_ids`` and ``attention_mask`` [B, T]).

    Returns ``{gram_key: GramStats}``, one entry per distinct input (``LinearInfo.gram_key``), plus
    ``{output_key(info): GramStats}`` (``Σ y yᵀ`` [out, out]) per output linear, float64 on the model's
    device. ``total`` (number of batches) is only used for progress when ``batches`` has no len.
    ``unpad`` (default: on CPU) forwards each example alone without its padding; ``precision``: see the
    module docstring.
    """
    progress = ensure_progress(progress)
    reps = gram_representatives(linears)
    outs = {output_key(info): info for info in outputs}
    if not reps and not outs:
        raise ValueError("collect_grams needs at least one linear (got an empty list)")
    product_dtype(precision, "cpu")  # an unknown precision fails before any forward
    model = private_view(model)  # the hooks below must never sit on a model another caller may be running
    modules = {}
    for key, info in [*reps.items(), *outs.items()]:
        try:
            modules[key] = model.get_submodule(info.path)
        except AttributeError:
            raise ValueError(f"the model has no linear named {info.name!r}") from None
    device = next(model.parameters()).device
    stats = {key: GramStats.zeros(info.in_features, device=device) for key, info in reps.items()}
    stats.update({key: GramStats.zeros(info.out_features, device=device) for key, info in outs.items()})
    hooks = sorted([(_execution_order(i, False), k) for k, i in reps.items()] +
                   [(_execution_order(i, True), k) for k, i in outs.items()])
    last_key = hooks[-1][1]
    state: dict = {"mask": None}
    dtype = product_dtype(precision, device)
    partial = {} if dtype == torch.float64 else {key: GramAccumulator(g, dtype) for key, g in stats.items()}

    infos = {**reps, **outs}
    routed = RoutedMasks(model, [info.name for info in infos.values()])  # an expert's rows: its routed tokens

    def make_hook(key: str):
        def hook(module, args, *output):
            x = output[0] if output else args[0]
            mask = routed.mask(infos[key].name, state["mask"])
            if partial:
                partial[key].add(x, mask)
            else:
                stats[key].add_(x, mask, precision)
            if key == last_key:
                raise _StopForward
        return hook

    handles = [modules[key].register_forward_pre_hook(make_hook(key)) for key in reps]
    handles += [modules[key].register_forward_hook(make_hook(key)) for key in outs]
    target = _forward_target(model, {**reps, **outs})
    n_total = _batch_total(batches, total)
    unpad = device.type == "cpu" if unpad is None else unpad
    try:
        for done, batch in enumerate(batches, 1):
            input_ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
            for ids, piece_mask in pieces(input_ids, mask, unpad):
                state["mask"] = piece_mask
                try:
                    # no padding: no mask, so attention takes its causal fast path (~10% of the forward)
                    mask_arg = None if bool(piece_mask.all()) else piece_mask
                    target(input_ids=ids, attention_mask=mask_arg, use_cache=False)
                except _StopForward:
                    pass
            progress(done, max(n_total, done), f"calibration batch {done}", stage="calibration")
    finally:
        for handle in handles:
            handle.remove()
        routed.remove()
        state["mask"] = None
    for part in partial.values():
        part.flush()
    return stats
