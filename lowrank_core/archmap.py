"""Architecture map: every compressible ``nn.Linear`` of a Llama/Mistral/Qwen2-family causal LM.

Module names follow the Hugging Face layout: ``model.layers.{i}.self_attn.{q,k,v,o}_proj``,
``model.layers.{i}.mlp.{gate,up,down}_proj`` and ``lm_head``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Union

import torch
from torch import nn

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
HEAD_MODULE = "lm_head"
ALL_MODULES = ATTN_MODULES + MLP_MODULES + (HEAD_MODULE,)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Linears that read the same input tensor share one Gram matrix.
SHARED_INPUT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
                "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in", "lm_head": "head_in"}


class UnsupportedArchitectureError(ValueError):
    """The model is not a Llama/Mistral/Qwen2-style decoder this tool knows how to factorise."""


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
        prefix = "" if self.layer is None else f"model.layers.{self.layer}."
        return prefix + SHARED_INPUT[self.module]

    def factor_params(self, rank: int) -> int:
        return rank * (self.out_features + self.in_features)

    def row(self) -> dict:
        d = asdict(self)
        d["shape"] = f"{self.out_features} x {self.in_features}"
        d["params"] = self.params
        d["break_even_rank"] = self.break_even_rank
        return d


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"unsupported architecture: model_type={model_type!r} "
            f"(architectures={getattr(config, 'architectures', None)}); "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")


def meta_model(config) -> nn.Module:
    """Instantiate a model from its config on the meta device: shapes only, no memory for weights."""
    from transformers import AutoModelForCausalLM

    check_supported(config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _short_name(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def linear_map(model_or_config: Union[nn.Module, "object"]) -> list[LinearInfo]:
    """List every compressible linear in model order (layer 0 q_proj ... layer N-1 down_proj, lm_head).

    Accepts a model (any device, also meta) or a ``PretrainedConfig``. Raises
    ``UnsupportedArchitectureError`` naming what was found if the layout is unknown.
    """
    model = model_or_config if isinstance(model_or_config, nn.Module) else meta_model(model_or_config)
    config = getattr(model, "config", None)
    if config is not None:
        check_supported(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    rows: list[LinearInfo] = []
    for name, mod in model.named_modules():
        short = _short_name(name)
        if short not in ALL_MODULES or not hasattr(mod, "in_features"):
            continue
        if short == HEAD_MODULE:
            layer, group = None, "head"
        else:
            parts = name.split(".")
            if "layers" not in parts:
                continue
            layer = int(parts[parts.index("layers") + 1])
            group = "attn" if short in ATTN_MODULES else "mlp"
        weight = getattr(mod, "weight", None)
        out_f, in_f = (weight.shape if weight is not None else (mod.out_features, mod.in_features))
        rows.append(LinearInfo(name=name, layer=layer, group=group, module=short,
                               out_features=int(out_f), in_features=int(in_f),
                               bias=getattr(mod, "bias", None) is not None,
                               tied=(short == HEAD_MODULE and tied)))
    if not any(r.group != "head" for r in rows):
        found = sorted({_short_name(n) for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise UnsupportedArchitectureError(
            f"no decoder linears named {', '.join(ALL_MODULES[:-1])} found in "
            f"{type(model).__name__}; linear modules found: {found or 'none'}")
    return rows


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
