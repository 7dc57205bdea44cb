"""``svd``: plain truncated SVD of the weight (no calibration data)."""
from __future__ import annotations

from ..decompose import svd_factors
from .base import Method, register


@register
class SVD(Method):
    name = "svd"
    summary = "plain truncated SVD of the weight (no calibration data)"
    order = 0

    def factorize(self, weight, rank, gram=None, bias=None):
        return svd_factors(weight, rank, bias=bias)
