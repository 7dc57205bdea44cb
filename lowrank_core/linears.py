"""The linear map: every compressible ``nn.Linear`` of a supported causal LM, read through the arch table
(``arch.py`` says where a family keeps its linears; this module lists a model's linears and counts them).

Module names follow the Hugging Face layout given by the model's :class:`~lowrank_core.arch.ArchSpec`
(for Llama/Mistral/Qwen2: ``model.layers.{i}.self_attn.{q,k,v,o}_proj``, ``model.layers.{i}.mlp.
{gate,up,down}_proj`` and ``lm_head``). A mixture-of-experts layer lists each expert's linears instead of
the dense MLP: ``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj`` (group ``experts``, ``expert = e``;
the experts are :class:`~lowrank_core.modeling_lowrank.ExpertList`\ s, built at load time); the router
(``mlp.gate``) is never a plan matrix.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional, Union

import torch
from torch import nn

from .arch import (ARCHS, EXPERTS_GROUP, SUPPORTED_MODEL_TYPES, UnsupportedArchitectureError, all_groups,
                   all_module_names, arch_of)
from .modeling_lowrank import unstack_experts

GROUPS = all_groups()                 # attn / mlp / all -> short names (every architecture)
ATTN_MODULES = GROUPS["attn"]
MLP_MODULES = GROUPS["mlp"]
ALL_MODULES = all_module_names()      # decoder linears in execution order, then the head
__all__ = ["ARCHS", "SUPPORTED_MODEL_TYPES", "UnsupportedArchitectureError", "LinearInfo", "linear_map",
           "meta_model", "count_parameters", "check_supported", "num_layers", "part_infos", "weight_of"]


@dataclass(frozen=True)
class LinearInfo:
    """One compressible linear layer. Shapes are ``out_features x in_features`` (PyTorch weight layout)."""

    name: str            # full module path, e.g. "model.layers.17.mlp.down_proj"
    layer: Optional[int]  # decoder layer index; None for lm_head
    group: str           # "attn", "mlp" or "head"
    module: str          # short name, e.g. "down_proj"
    out_features: int
    in_features: int
    bias: bool = False
    tied: bool = False   # lm_head sharing its weight with the input embedding
    input_key: str = ""  # key of the input Gram (set by linear_map from the arch table)
    # a part of a fused linear (Phi-3's q_proj in qkv_proj): the fused module's path, this part's output
    # rows [start, stop) in it and every part's (short, start, stop); empty for a whole linear
    fused: str = ""
    rows: tuple = ()
    layout: tuple = ()
    position: int = 0    # execution order within the layer (the arch table's order of linears)

    @property
    def path(self) -> str:
        """The module that computes this matrix in the teacher (the fused linear for a part)."""
        return self.fused or self.name
    expert: Optional[int] = None  # expert index of a mixture-of-experts linear (group "experts")

    @property
    def params(self) -> int:
        """Weight parameters (bias excluded: it is kept as is by every factorisation)."""
        return self.out_features * self.in_features

    @property
    def break_even_rank(self) -> int:
        """Largest rank whose factors ``r*(in+out)`` do not exceed the dense ``out*in`` weight."""
        return (self.out_features * self.in_features) // (self.out_features + self.in_features)

    @property
    def max_rank(self) -> int:
        return min(self.out_features, self.in_features)

    @property
    def gram_key(self) -> str:
        """Key of the input Gram matrix this linear reads (q/k/v share one, gate/up share one)."""
        return self.input_key or ARCHS["llama"].input_key(self.layer, self.module)

    def factor_params(self, rank: int) -> int:
        return rank * (self.out_features + self.in_features)

    def row(self) -> dict:
        d = asdict(self)
        for key in ("input_key", "fused", "rows", "layout", "position"):
            d.pop(key)
        d["shape"] = f"{self.out_features} x {self.in_features}"
        d["params"] = self.params
        d["break_even_rank"] = self.break_even_rank
        return d


def check_supported(config) -> None:
    """Raise ``UnsupportedArchitectureError`` unless the arch table has the config's model type."""
    arch_of(config)


def meta_model(config) -> nn.Module:
    """Instantiate a model from its config on the meta device: shapes only, no memory for weights."""
    from transformers import AutoModelForCausalLM

    check_supported(config)
    with torch.device("meta"):
        return unstack_experts(AutoModelForCausalLM.from_config(config))


def linear_map(model_or_config: Union[nn.Module, "object"], parts: bool = False) -> list[LinearInfo]:
    """List every compressible linear in model order (layer 0 q_proj ... layer N-1 down_proj, lm_head).

    Accepts a model (any device, also meta) or a ``PretrainedConfig``. ``parts``: each fused linear
    (``ArchSpec.fused``) is followed by its parts, named ``<fused>.<part>`` (e.g. ``...qkv_proj.k_proj``),
    the row slices a plan may factorise instead of the whole. Raises ``UnsupportedArchitectureError``
    naming what was found if the layout is unknown.
    """
    model = model_or_config if isinstance(model_or_config, nn.Module) else meta_model(model_or_config)
    spec = arch_of(model)
    tied = spec.tied(getattr(model, "config", None))
    rows: list[LinearInfo] = []
    for index, layer in enumerate(spec.decoder_layers(model)):
        experts = spec.experts_of(layer)
        for position, short in enumerate(spec.decoder_modules):
            if experts is not None and short in spec.expert_linears:
                if short == next(iter(spec.expert_linears)):
                    rows += _expert_rows(model, spec, index, len(experts), position)
                continue
            whole = replace(_info(model, spec.linear_name(index, short), index, spec.group_of(short), short,
                                  spec.input_key(index, short), False), position=position)
            rows.append(whole)
            if parts and short in spec.fused:
                rows.extend(part_infos(whole, spec.part_rows(model.config, short)))
    try:
        spec.head_of(model)
    except UnsupportedArchitectureError:
        return rows
    rows.append(_info(model, spec.head, None, "head", spec.head_module, spec.input_key(None, spec.head_module), tied))
    return rows


def _expert_rows(model, spec, index: int, n_experts: int, position: int) -> list[LinearInfo]:
    """Every expert's linears of MoE layer ``index``, expert by expert (their execution order)."""
    return [replace(_info(model, spec.expert_name(index, e, short), index, EXPERTS_GROUP, short,
                          spec.expert_input_key(index, e, short), False), expert=e, position=position + k)
            for e in range(n_experts) for k, short in enumerate(spec.expert_linears)]


def part_infos(whole: LinearInfo, layout: tuple) -> list[LinearInfo]:
    """The parts of fused linear ``whole`` given ``layout`` ``((short, start, stop), ...)``; the rows must
    cover its output exactly."""
    if not layout or layout[-1][2] != whole.out_features:
        raise UnsupportedArchitectureError(f"{whole.name}: the parts {layout} do not cover its "
                                           f"{whole.out_features} output rows")
    return [replace(whole, name=f"{whole.name}.{short}", module=short, out_features=stop - start,
                    fused=whole.name, rows=(start, stop), layout=layout)
            for short, start, stop in layout]


def weight_of(root: nn.Module, info: LinearInfo, prefix: str = "") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight [out, in], bias [out] or None) of ``info`` in ``root`` (detached; a part's rows of its fused
    linear are views). ``prefix``: ``root`` is the module at that path (a decoder layer ``model.layers.3.``)."""
    module = root.get_submodule(info.path[len(prefix):])
    weight, bias = module.weight.detach(), None if module.bias is None else module.bias.detach()
    if info.rows:
        start, stop = info.rows
        weight, bias = weight[start:stop], None if bias is None else bias[start:stop]
    return weight, bias


def _info(model, name, layer, group, short, key, tied) -> LinearInfo:
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        found = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise UnsupportedArchitectureError(f"no linear {name!r} in {type(model).__name__}; linear modules "
                                           f"found: {found or 'none'}") from None
    weight = getattr(mod, "weight", None)
    out_f, in_f = (weight.shape if weight is not None else (mod.out_features, mod.in_features))
    return LinearInfo(name=name, layer=layer, group=group, module=short, out_features=int(out_f),
                      in_features=int(in_f), bias=getattr(mod, "bias", None) is not None, tied=tied, input_key=key)


def num_layers(linears: list[LinearInfo]) -> int:
    return 1 + max(r.layer for r in linears if r.layer is not None)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters of a module tree (a tied weight counts once). Works on meta models."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
