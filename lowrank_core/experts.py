"""Mixture-of-experts plumbing of the engine: the padding mask of the rows each expert sees, and the
re-stacking of per-expert tensors into transformers' layout for a dense export.

The experts of a loaded MoE model are :class:`~lowrank_core.modeling_lowrank.ExpertList`\\ s (built at load
time): expert ``e``'s linears see only the rows routed to it (``[n_e, hidden]``), so a Gram hook on them
sums exactly those rows; the routing weights multiply the expert's output, never its input.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from .modeling_lowrank import ExpertList, routed


def expert_of(root: nn.Module, name: str) -> Optional[tuple[str, int]]:
    """(experts module path, expert index) of a linear ``<path>.<e>.<short>`` inside an ExpertList."""
    parts = name.rsplit(".", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    try:
        module = root.get_submodule(parts[0])
    except AttributeError:
        return None
    return (parts[0], int(parts[1])) if isinstance(module, ExpertList) else None


class RoutedMasks:
    """Pre-hooks on the ExpertList modules holding any of ``names`` record each call's routing; ``mask(name,
    mask [B, T])`` is then the ``[n_e]`` real-token mask of the rows that linear sees (other names: as given).
    Call :meth:`remove` when done (hooks go on ``root``: pass a private view)."""

    def __init__(self, root: nn.Module, names: Iterable[str]):
        self.where = {n: w for n in names if (w := expert_of(root, n)) is not None}
        self.routing: dict[str, Tensor] = {}
        self.handles = [root.get_submodule(p).register_forward_pre_hook(self._record(p))
                        for p in {p for p, _ in self.where.values()}]

    def _record(self, path: str):
        def hook(_module, args):
            self.routing[path] = args[1]   # top_k_index [N, k]
        return hook

    def mask(self, name: str, mask: Optional[Tensor]) -> Optional[Tensor]:
        if mask is None or name not in self.where:
            return mask
        path, expert = self.where[name]
        _, tokens = routed(self.routing[path], expert)
        return mask.reshape(-1)[tokens.to(mask.device)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def stacked_tensors(model: nn.Module, thunks: dict[str, Callable[[], Tensor]]) -> dict[str, Callable[[], Tensor]]:
    """``thunks`` ({state key: thunk}) with each ExpertList's per-expert ``<path>.<e>.{gate,up,down}_proj.weight``
    replaced by transformers' ``<path>.gate_up_proj [E, 2I, H]`` and ``<path>.down_proj [E, H, I]``."""
    out = dict(thunks)
    for path, module in model.named_modules():
        if not isinstance(module, ExpertList):
            continue
        keys = {short: [f"{path}.{e}.{short}.weight" for e in range(len(module))]
                for short in ("gate_proj", "up_proj", "down_proj")}
        got = {short: [out.pop(k) for k in ks] for short, ks in keys.items()}
        out[f"{path}.gate_up_proj"] = (lambda g=got["gate_proj"], u=got["up_proj"]: torch.stack(
            [torch.cat([a(), b()], dim=0) for a, b in zip(g, u)]))
        out[f"{path}.down_proj"] = (lambda d=got["down_proj"]: torch.stack([t() for t in d]))
    return out
