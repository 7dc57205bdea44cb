"""Solved whitened bases kept for a whole search without their Grams (the layer-by-layer profile).

A :class:`~lowrank_core.decompose.WhitenedBasis` holds its matrix's eigenvectors and a reference to its
:class:`~lowrank_core.decompose.Whitening`, i.e. the float64 input Gram (and, once computed, its factor
``L``). Kept for every matrix of a model that is every Gram at once (Mistral-7B: 65.5 GB).
:class:`StoredBasis` keeps only what the factors at any rank and the gradient scores need:

- the whitened singular values (float64, ``min(out, in)``) and eigenvectors (``min(out, in)²``, float64
  or, with ``dtype=float32``, half that: they are orthonormal, so float32 rounding moves every factor by
  ~1e-7 relative in the output-error metric — see ``docs/7b-path.md``);
- for a tall matrix (``out > in``: gate/up), the Gram's factor ``L`` (``in²``, always float64: its
  rounding error would be amplified by ``cond(L)``), one tensor per shared input (gate and up share it);
  a wide matrix (``out <= in``: q/k/v/o/down) needs no factor of ``G`` at all (``W′ = U Uᵀ W``).

The Gram itself is never kept. :meth:`StoredBasis.live` rebuilds a float64 ``WhitenedBasis`` on a compute
device whose :meth:`~lowrank_core.decompose.WhitenedBasis.factors` run the very same code as before on the
very same values: factors from a float64 store are bit-identical to those of the original basis.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..decompose import FactorizationError, WhitenedBasis, Whitening

BASIS_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class _KeptWhitening(Whitening):
    """A :class:`Whitening` without its Gram: the factor ``L`` (tall matrices) or nothing (wide ones)."""

    def __init__(self, stored: "StoredBasis", device: torch.device):
        self.gram = None
        self.kind, self.damping = stored.kind, stored.damping
        self._in, self._device = stored.in_features, torch.device(device)
        self._factor: Optional[Tensor] = None
        self._eig = None
        if stored.factor is not None:
            kind, *parts = stored.factor
            parts = [t.to(self._device, torch.float64) for t in parts]
            if kind == "eigh":
                q, root = parts
                self._eig, self._factor = (q, root), q * root   # as Whitening._compute builds it
            else:
                self._factor = parts[0]

    @property
    def in_features(self) -> int:
        return self._in

    @property
    def device(self) -> torch.device:
        return self._device

    def _compute(self) -> None:
        raise FactorizationError("this basis was kept without its Gram: a wide matrix's factors need no factor of G")

    def output_covariance(self, W: Tensor) -> Tensor:
        raise FactorizationError("this basis was kept without its Gram (layer-by-layer profile)")


def _stored_factor(wh: Whitening, device) -> tuple:
    """``("cholesky", L)`` or ``("eigh", Q, √λ)`` of ``wh``, float64 on ``device``."""
    wh.factor  # computed (a tall basis has already computed it)
    if wh.kind == "eigh":
        q, root = wh.eigen_factor
        return "eigh", q.to(device), root.to(device)
    return "cholesky", wh.factor.to(device)


class StoredBasis(WhitenedBasis):
    """A solved :class:`WhitenedBasis` without its Gram: ``values`` float64, ``vectors`` in the stored
    dtype, and for a tall matrix the factor of its Gram (``factor``: ``("cholesky", L)`` or
    ``("eigh", Q, √λ)``, float64, one tensor tuple shared by the bases of one input: gate and up keep
    one ``L``). Build with :meth:`of`; :meth:`to` moves / casts it; ``factors(W, r)`` and :meth:`live`
    compute in float64 on the weight's / the given device."""

    wide: bool
    values: Tensor
    vectors: Tensor
    in_features: int
    kind: Optional[str]
    damping: float
    factor: Optional[tuple]

    def __init__(self, basis: WhitenedBasis, device="cpu", dtype: torch.dtype = torch.float64,
                 factors: Optional[dict] = None):
        """``StoredBasis.of(basis, device, dtype, factors)``: see :meth:`of`."""
        wh = basis.whitening
        self.wide, self.values, self.vectors = basis.wide, basis.values.to(device), basis.vectors.to(device, dtype)
        self.in_features, self.kind, self.damping = wh.in_features, wh.kind, wh.damping
        self.factor = None
        if not self.wide:
            shared = {} if factors is None else factors
            if id(wh) not in shared:
                shared[id(wh)] = _stored_factor(wh, device)
            self.factor = shared[id(wh)]

    @classmethod
    def of(cls, basis: WhitenedBasis, device="cpu", dtype: torch.dtype = torch.float64,
           factors: Optional[dict] = None) -> "StoredBasis":
        """``basis`` kept on ``device`` with its eigenvectors in ``dtype``; ``factors`` (``{id: factor}``, one
        dict per layer) shares one Gram factor between the bases of one input. Tensors already on
        ``device`` in ``dtype`` are not copied."""
        return cls(basis, device, dtype, factors)

    def to(self, device, dtype: Optional[torch.dtype] = None, factors: Optional[dict] = None) -> "StoredBasis":
        """A copy on ``device`` (eigenvectors in ``dtype``, default unchanged; the factor stays float64);
        pass one ``factors`` dict for the bases of a layer to keep their shared factor shared."""
        out = StoredBasis.__new__(StoredBasis)
        out.wide, out.in_features, out.kind, out.damping = self.wide, self.in_features, self.kind, self.damping
        out.values = self.values.to(device)
        out.vectors = self.vectors.to(device, dtype or self.vectors.dtype)
        out.factor = None
        if self.factor is not None:
            shared = {} if factors is None else factors
            if id(self.factor) not in shared:
                shared[id(self.factor)] = (self.factor[0], *(t.to(device) for t in self.factor[1:]))
            out.factor = shared[id(self.factor)]
        return out

    @property
    def whitening(self) -> Whitening:
        return _KeptWhitening(self, self.vectors.device)

    @property
    def nbytes(self) -> int:
        """Bytes of the values and vectors (the shared factor is counted by :func:`factor_bytes`)."""
        return self.values.numel() * self.values.element_size() + self.vectors.numel() * self.vectors.element_size()

    def live(self, device=None) -> WhitenedBasis:
        """A float64 :class:`WhitenedBasis` on ``device`` (default: where this one is kept); no copy of a
        tensor already there in float64."""
        device = torch.device(device) if device is not None else self.vectors.device
        b = WhitenedBasis.__new__(WhitenedBasis)
        b.wide = self.wide
        b.values = self.values.to(device)
        b.vectors = self.vectors.to(device, torch.float64)
        b.whitening = _KeptWhitening(self, device)
        return b

    def factors(self, W: Tensor, rank: int, bias: Optional[Tensor] = None):
        """Optimal rank-``rank`` factors of ``W`` (the weight this basis was solved for), computed on ``W``'s
        device: :meth:`WhitenedBasis.factors` on :meth:`live`."""
        return self.live(W.device).factors(W, rank, bias)


def live_basis(basis: WhitenedBasis, device) -> WhitenedBasis:
    """``basis`` ready for float64 maths on ``device``: a :class:`StoredBasis` rebuilt there, a plain
    ``WhitenedBasis`` as it is (its maths runs where its Gram lives)."""
    return basis.live(device) if isinstance(basis, StoredBasis) else basis


def factor_bytes(bases) -> int:
    """Bytes of the distinct Gram factors the stored ``bases`` keep (one per tall matrices' input)."""
    seen: dict[int, int] = {}
    for b in bases:
        if isinstance(b, StoredBasis) and b.factor is not None:
            seen[id(b.factor)] = sum(t.numel() * t.element_size() for t in b.factor[1:])
    return sum(seen.values())
