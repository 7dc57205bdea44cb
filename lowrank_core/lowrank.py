"""``LowRankLinear``: a drop-in replacement for ``nn.Linear`` holding rank-r factors.

``y = up(down(x))`` with ``down: in -> r`` (no bias) and ``up: r -> out`` (optional bias). State-dict
names are ``<name>.down.weight`` [r, in], ``<name>.up.weight`` [out, r] and ``<name>.up.bias`` [out];
exports rely on them. ``low_rank_modules`` / ``ranks_of`` find such modules in a model by that shape (also
the factorized export's own class, loaded through remote code).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .decompose import Factors


class LowRankLinear(nn.Module):
    """Rank-``rank`` factorised linear map ``in_features -> out_features``; parameters ``rank*(in+out)`` (+ bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        for label, v in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{label}={v!r} is not allowed; it must be a positive integer")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, factors: Factors, dtype: Optional[torch.dtype] = None) -> "LowRankLinear":
        """A module whose weights are copies of ``factors`` (in ``dtype``, default the factors' dtype)."""
        up, down = factors.up, factors.down
        if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"factors do not chain: up {tuple(up.shape)} @ down {tuple(down.shape)}; "
                             f"expected up [out, r] and down [r, in]")
        dtype = dtype or up.dtype
        out_f, rank = up.shape
        module = cls(int(down.shape[1]), int(out_f), int(rank), bias=factors.bias is not None,
                     device=up.device, dtype=dtype)
        with torch.no_grad():
            module.down.weight.copy_(down)
            module.up.weight.copy_(up)
            if factors.bias is not None:
                module.up.bias.copy_(factors.bias)
        return module

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    @property
    def bias(self) -> Optional[Tensor]:
        return self.up.bias

    def factors(self) -> Factors:
        """The current factors (detached views of the parameters)."""
        b = self.up.bias
        return Factors(self.up.weight.detach(), self.down.weight.detach(), None if b is None else b.detach())

    def merged_weight(self) -> Tensor:
        """Dense weight ``up @ down`` [out, in] (detached)."""
        with torch.no_grad():
            return self.up.weight @ self.down.weight

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same map with the merged dense weight."""
        w = self.up.weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.up.bias is not None,
                           device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.merged_weight())
            if self.up.bias is not None:
                linear.bias.copy_(self.up.bias)
        return linear

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.up.bias is not None}")


def low_rank_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of every low-rank module of ``model``: any module with ``down`` and ``up`` ``nn.Linear``
    children (``LowRankLinear`` or a factorized export's class)."""
    return {name: mod for name, mod in model.named_modules()
            if isinstance(getattr(mod, "down", None), nn.Linear) and isinstance(getattr(mod, "up", None), nn.Linear)}


def ranks_of(model: nn.Module) -> dict[str, int]:
    """{module name: rank} of every low-rank module (the rows of its ``down.weight [r, in]``)."""
    return {name: int(mod.down.weight.shape[0]) for name, mod in low_rank_modules(model).items()}
