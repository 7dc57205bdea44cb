"""Remote-code modeling file copied into every *factorized* lowrank export.

``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` finds this file through the
``auto_map`` entry of the export's ``config.json``. It depends on torch and transformers only (never on
``lowrank_core``). The export writes a copy with the three ``BASE_*`` lines below set to the base
architecture's model_type and transformers class names (from ``lowrank_core.arch``); the classes
subclass those and, before any weight is loaded, swap every matrix listed in ``config.lowrank_ranks``
(``{module name: rank}``) for a :class:`LowRankLinear` whose ``down.weight [rank, in]`` and
``up.weight [out, rank]`` (and ``up.bias``) are read from the export's safetensors; a fused linear listed in
``config.lowrank_slices`` ({name: [[part, rows], ...]}) first becomes a :class:`SlicedLinear` of its parts. Mixture-of-experts
layers (transformers' stacked ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``) are first rebuilt as
an :class:`ExpertList` of per-expert linears (``experts.5.gate_proj``), the same forward.
"""
from __future__ import annotations

import torch
import transformers
from torch import nn

BASE_MODEL_TYPE = "llama"
BASE_CONFIG_CLASS = "LlamaConfig"
BASE_MODEL_CLASS = "LlamaForCausalLM"


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: ``down`` maps in -> rank (no bias), ``up`` maps rank -> out (optional bias)."""

    def __init__(self, in_features, out_features, rank, bias=False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = int(in_features), int(out_features), int(rank)
        self.down = nn.Linear(self.in_features, self.rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(self.rank, self.out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def swap_low_rank(model: nn.Module, ranks: dict) -> None:
    """Replace each ``nn.Linear`` named in ``ranks`` by a LowRankLinear of that rank (same device/dtype)."""
    for name, rank in (ranks or {}).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        weight = old.weight
        setattr(parent, child, LowRankLinear(old.in_features, old.out_features, rank, bias=old.bias is not None,
                                             device=weight.device, dtype=weight.dtype))


class SlicedLinear(nn.Module):
    """A fused linear kept as parts: ``y = [part_1(x), ..., part_n(x)]``, children named by the parts."""

    def __init__(self, in_features, layout, bias=False, device=None, dtype=None):
        super().__init__()
        self.part_names = tuple(short for short, _ in layout)
        self.in_features, self.out_features = int(in_features), sum(int(rows) for _, rows in layout)
        for short, rows in layout:
            self.add_module(short, nn.Linear(self.in_features, int(rows), bias=bias, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self, short)(x) for short in self.part_names], dim=-1)

    def layout(self) -> list:
        return [[short, int(getattr(self, short).out_features)] for short in self.part_names]


def swap_sliced(model: nn.Module, slices: dict) -> None:
    """Replace each fused ``nn.Linear`` named in ``slices`` ({name: [[part, rows], ...]}) by a SlicedLinear."""
    for name, layout in (slices or {}).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        setattr(parent, child, SlicedLinear(old.in_features, layout, bias=old.bias is not None,
                                            device=old.weight.device, dtype=old.weight.dtype))


class Expert(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, x ``[n, hidden]`` -> ``[n, hidden]``."""

    def __init__(self, hidden, intermediate, act_fn, device=None, dtype=None):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, device=device, dtype=dtype)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, device=device, dtype=dtype)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def routed(top_k_index: torch.Tensor, expert: int):
    """(top-k slot, token row) of the rows routed to ``expert`` (``top_k_index [N, k]``), in the order
    transformers' experts loop visits them."""
    return torch.where(top_k_index.T == expert)


class ExpertList(nn.ModuleList):
    """Drop-in for transformers' stacked experts module: ``forward(hidden [N, H], top_k_index [N, k],
    top_k_weights [N, k]) -> [N, H]``, each expert an :class:`Expert` seeing only its routed rows."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            pos, tokens = routed(top_k_index, e)
            if tokens.numel():
                y = expert(hidden_states[tokens]) * top_k_weights[tokens, pos, None]
                out.index_add_(0, tokens, y.to(out.dtype))
        return out

    @classmethod
    def from_stacked(cls, stacked: nn.Module) -> "ExpertList":
        gate_up, down = stacked.gate_up_proj.detach(), stacked.down_proj.detach()
        n, inter, hidden = down.shape[0], down.shape[2], down.shape[1]
        out = cls(Expert(hidden, inter, stacked.act_fn, device=down.device, dtype=down.dtype) for _ in range(n))
        grad = stacked.down_proj.requires_grad
        for e, expert in enumerate(out):
            expert.gate_proj.weight = nn.Parameter(gate_up[e, :inter].clone(), requires_grad=grad)
            expert.up_proj.weight = nn.Parameter(gate_up[e, inter:].clone(), requires_grad=grad)
            expert.down_proj.weight = nn.Parameter(down[e].clone(), requires_grad=grad)
        return out


def is_stacked_experts(module: nn.Module) -> bool:
    """transformers' v5 experts: 3-D ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` parameters."""
    p, q = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(p, nn.Parameter) and isinstance(q, nn.Parameter) and p.dim() == 3 and q.dim() == 3


def unstack_experts(model: nn.Module) -> nn.Module:
    """Replace every stacked experts module of ``model`` (in place, at build time) by an ExpertList."""
    names = [name for name, module in model.named_modules() if is_stacked_experts(module)]
    for name in names:  # one layer at a time: its stacked tensors are freed once replaced (peak: one layer's)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ExpertList.from_stacked(getattr(parent, child)))
    return model


class _LowRankMixin:
    """Swaps the fused linears named in ``config.lowrank_slices`` for their parts, then the linears named in
    ``config.lowrank_ranks``, right after the base model is built."""

    def __init__(self, config):
        super().__init__(config)
        unstack_experts(self)
        swap_sliced(self, getattr(config, "lowrank_slices", None) or {})
        swap_low_rank(self, getattr(config, "lowrank_ranks", None) or {})


# Extra config keys (``lowrank_ranks``, ``lowrank_slices``, ``lowrank_base_model_type``) are kept as attributes by transformers.
class LowRankConfig(getattr(transformers, BASE_CONFIG_CLASS)):
    model_type = "lowrank_" + BASE_MODEL_TYPE


class LowRankForCausalLM(_LowRankMixin, getattr(transformers, BASE_MODEL_CLASS)):
    config_class = LowRankConfig
