"""``whitened``: the activation-aware closed form (SVD-LLM): the rank-r weight with the least output
error ``‖(W − W′)Xᵀ‖²`` on the calibration tokens (see ``decompose.WhitenedBasis``)."""
from __future__ import annotations

from ..decompose import FactorizationError, WhitenedBasis, whitened_factors
from .base import Method, register


@register
class Whitened(Method):
    name = "whitened"
    summary = "activation-aware closed form (SVD-LLM): least output error on the calibration tokens"
    order = 1
    needs_grams = True
    output_covariance = True   # W G Wᵀ is all it needs for out <= in

    def factorize(self, weight, rank, gram=None, bias=None):
        if gram is None:
            raise FactorizationError(f"method {self.name!r} needs the input Gram matrix (gram=...); collect it "
                                     "(or, for out <= in, the output covariance) with calibrate.collect_grams or use "
                                     "method 'svd'")
        return whitened_factors(weight, gram, rank, bias=bias)

    def basis(self, weight, gram) -> WhitenedBasis:
        """The solved eigenproblem of one matrix: its error at every rank and its factors at any rank."""
        return WhitenedBasis(weight, gram)
