"""The architecture table: what the engine knows about each supported decoder family, one entry each.

Every module that needs to find a decoder layer, a linear, the final norm or the head asks the
:class:`ArchSpec` of the model (``arch_of(model_or_config)``) instead of spelling out paths. A new
architecture is one entry in :data:`ARCHS` (plus a tiny-model test): its linears and groups, which
linears read the same input (and so share a Gram), where the decoder layers, the final norm and the
head live, how tying is configured, and the transformers classes the factorized export subclasses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
from torch import nn

LLAMA_LINEARS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                 "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
                 "down_proj": "mlp.down_proj"}
LLAMA_GROUPS = {"attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
# Linears that read the same input tensor share one Gram (key relative to the layer).
LLAMA_INPUTS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
                "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}
# Fused linears (Phi-3): [q; k; v] and [gate; up] stacked on the output rows. A part's rows come from the config:
ROW_SIZES = {  # size key -> rows of one part
    "heads": lambda c: c.num_attention_heads * _head_dim(c),
    "kv_heads": lambda c: (getattr(c, "num_key_value_heads", None) or c.num_attention_heads) * _head_dim(c),
    "intermediate": lambda c: c.intermediate_size,
}
FUSED_QKV_GATE_UP = {"qkv_proj": (("q_proj", "heads"), ("k_proj", "kv_heads"), ("v_proj", "kv_heads")),
                     "gate_up_proj": (("gate_proj", "intermediate"), ("up_proj", "intermediate"))}
# Mixture of experts: every expert's linears are plan matrices (group "experts"; "mlp" holds them too, with
# any dense MLP); the router stays dense. Expert e's gate/up share one Gram, of the rows routed to e.
EXPERTS_GROUP = "experts"
MOE_GROUPS = {**LLAMA_GROUPS, EXPERTS_GROUP: LLAMA_GROUPS["mlp"]}
EXPERT_INPUTS = {"gate_proj": "expert_in", "up_proj": "expert_in", "down_proj": "expert_down_in"}


class UnsupportedArchitectureError(ValueError):
    """The model is not a decoder this tool knows how to factorise; the message names what was found."""


@dataclass(frozen=True)
class ArchSpec:
    """One decoder family. Paths are dotted module paths from the ``*ForCausalLM`` root."""

    model_type: str
    hf_config: str                      # transformers config class the factorized export subclasses
    hf_model: str                       # transformers model class the factorized export subclasses
    linears: Mapping[str, str] = field(default_factory=lambda: dict(LLAMA_LINEARS))  # short -> path in a layer
    groups: Mapping[str, tuple] = field(default_factory=lambda: dict(LLAMA_GROUPS))  # group -> short names
    inputs: Mapping[str, str] = field(default_factory=lambda: dict(LLAMA_INPUTS))    # short -> shared input
    decoder: str = "model"              # the decoder stack (embeddings, layers, final norm)
    layers: str = "model.layers"        # the ModuleList of decoder layers
    norm: str = "model.norm"            # the final norm before the head
    head: str = "lm_head"               # the output projection (a compressible linear, named "lm_head")
    tie_attr: str = "tie_word_embeddings"
    plain_head: bool = True             # logits == logits_of(model, norm(last hidden)): head on answer tokens only
    logits_divisor: Optional[str] = None  # config attribute the logits are divided by (Granite: logits_scaling)
    softcap_attr: Optional[str] = None  # config attribute of a final logit soft-cap c: logits = c·tanh(logits / c)
    tiny: Mapping[str, object] = field(default_factory=dict)  # overrides of the tiny test config
    # fused short -> its parts in row order: ((part short, ROW_SIZES key), ...); a plan may name either
    fused: Mapping[str, tuple] = field(default_factory=dict)
    experts: str = ""                   # path in a layer of the (stacked) experts module; "" = no MoE
    expert_linears: Mapping[str, str] = field(default_factory=lambda: dict(EXPERT_INPUTS))  # short -> input

    # ---- names
    @property
    def decoder_modules(self) -> tuple[str, ...]:
        """Short names of the decoder linears, in execution order within a layer."""
        return tuple(self.linears)

    @property
    def head_module(self) -> str:
        return self.head.rsplit(".", 1)[-1]

    def group_of(self, short: str) -> str:
        if short == self.head_module:
            return "head"
        for group, names in self.groups.items():
            if short in names:
                return group
        raise KeyError(short)

    @property
    def part_modules(self) -> tuple[str, ...]:
        """Short names of the parts of fused linears (``q_proj`` ... ``up_proj`` for Phi-3)."""
        return tuple(part for parts in self.fused.values() for part, _ in parts)

    def part_rows(self, config, short: str) -> tuple[tuple[str, int, int], ...]:
        """``((part, start, stop), ...)``: the output rows of each part of fused linear ``short`` (empty when
        ``short`` is not fused)."""
        out, start = [], 0
        for part, size in self.fused.get(short, ()):
            rows = int(ROW_SIZES[size](config))
            out.append((part, start, start + rows))
            start += rows
        return tuple(out)

    def layer_prefix(self, index: int) -> str:
        """``"model.layers.17."``: the path prefix of decoder layer ``index``."""
        return f"{self.layers}.{index}."

    def linear_name(self, index: Optional[int], short: str) -> str:
        return self.head if index is None else self.layer_prefix(index) + self.linears[short]

    def input_key(self, index: Optional[int], short: str) -> str:
        """Key of the input Gram a linear reads (q/k/v share one, gate/up share one; the head its own)."""
        return "head_in" if index is None else self.layer_prefix(index) + self.inputs[short]

    def expert_name(self, index: int, expert: int, short: str) -> str:
        """``model.layers.3.mlp.experts.5.gate_proj``: linear ``short`` of expert ``expert`` in layer ``index``."""
        return f"{self.layer_prefix(index)}{self.experts}.{expert}.{short}"

    def expert_input_key(self, index: int, expert: int, short: str) -> str:
        return f"{self.layer_prefix(index)}{self.experts}.{expert}.{self.expert_linears[short]}"

    def experts_of(self, layer: nn.Module) -> Optional[nn.Module]:
        """The experts module of a decoder layer, or None (no MoE, or a dense-MLP layer of a MoE model)."""
        if not self.experts:
            return None
        try:
            return layer.get_submodule(self.experts)
        except AttributeError:
            return None

    def tied(self, config) -> bool:
        return bool(getattr(config, self.tie_attr, False))

    def softcap(self, config) -> Optional[float]:
        """The final logit soft-cap of ``config`` (None: the head's outputs are the logits)."""
        cap = getattr(config, self.softcap_attr, None) if self.softcap_attr else None
        return float(cap) if cap else None

    # ---- modules
    def decoder_of(self, model: nn.Module) -> nn.Module:
        return _get(model, self.decoder)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.layers)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return _get(model, self.norm)

    def head_of(self, model: nn.Module) -> nn.Module:
        return _get(model, self.head)

    def logits_of(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits ``[..., vocab]`` from final hidden states ``[..., hidden]`` (after the final
        norm), as the model's forward computes them: the head, divided by ``config.<logits_divisor>`` when
        the family scales its logits (Granite), then the table's soft-cap when the config sets one (Gemma)."""
        logits = self.head_of(model)(hidden)
        if self.logits_divisor is not None:
            logits = logits / getattr(model.config, self.logits_divisor)
        cap = self.softcap(getattr(model, "config", None))
        return logits if cap is None else torch.tanh(logits / cap) * cap


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _get(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no module {path!r}") from None


ARCHS: dict[str, ArchSpec] = {spec.model_type: spec for spec in (
    ArchSpec("llama", "LlamaConfig", "LlamaForCausalLM", tiny={"tie_word_embeddings": True}),
    ArchSpec("mistral", "MistralConfig", "MistralForCausalLM"),
    ArchSpec("qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
    # q_norm / k_norm (per head) after q_proj / k_proj: the linears and their inputs are Llama's
    ArchSpec("qwen3", "Qwen3Config", "Qwen3ForCausalLM", tiny={"head_dim": 16}),
    # norms after attention and MLP (no input norms: q/k/v and gate/up read the raw residual), q/k norms
    ArchSpec("olmo2", "Olmo2Config", "Olmo2ForCausalLM"),
    # no_rope_layers: every 2nd tiny layer attends without rotary embeddings (the switch lives in the layer); tied
    ArchSpec("smollm3", "SmolLM3Config", "SmolLM3ForCausalLM",
             tiny={"no_rope_layer_interval": 2, "tie_word_embeddings": True}),
    # embedding / residual / attention multipliers (inside the embedding and the layers), logits / logits_scaling
    ArchSpec("granite", "GraniteConfig", "GraniteForCausalLM", logits_divisor="logits_scaling",
             tiny={"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.0625,
                   "logits_scaling": 4.0}),
    # Gemma 2 / 3 (text): sandwich norms, scaled embeddings, alternating sliding / global layers (Gemma 3: a
    # rope per kind), head_dim != hidden / heads, a tied head; tiny: a window of 4, small caps that bite.
    ArchSpec("gemma2", "Gemma2Config", "Gemma2ForCausalLM", softcap_attr="final_logit_softcapping",
             tiny={"tie_word_embeddings": True, "head_dim": 24, "query_pre_attn_scalar": 24, "sliding_window": 4,
                   "final_logit_softcapping": 0.2, "attn_logit_softcapping": 0.5}),
    ArchSpec("gemma3_text", "Gemma3TextConfig", "Gemma3ForCausalLM", softcap_attr="final_logit_softcapping",
             tiny={"tie_word_embeddings": True, "head_dim": 24, "query_pre_attn_scalar": 24, "sliding_window": 4,
                   "sliding_window_pattern": 2, "final_logit_softcapping": 0.2}),
    ArchSpec("phi3", "Phi3Config", "Phi3ForCausalLM",  # Phi-3 and Phi-4: fused qkv_proj and gate_up_proj
             linears={"qkv_proj": "self_attn.qkv_proj", "o_proj": "self_attn.o_proj",
                      "gate_up_proj": "mlp.gate_up_proj", "down_proj": "mlp.down_proj"},
             groups={"attn": ("qkv_proj", "o_proj"), "mlp": ("gate_up_proj", "down_proj")},
             inputs={"qkv_proj": "attn_in", "o_proj": "o_in", "gate_up_proj": "mlp_in", "down_proj": "down_in"},
             fused=FUSED_QKV_GATE_UP, tiny={"original_max_position_embeddings": 512}),
    ArchSpec("mixtral", "MixtralConfig", "MixtralForCausalLM", groups=MOE_GROUPS, experts="mlp.experts",
             tiny={"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32}),
    ArchSpec("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", groups=MOE_GROUPS, experts="mlp.experts",
             tiny={"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16,
                   "decoder_sparse_step": 1, "mlp_only_layers": [0], "norm_topk_prob": True}),
)}
SUPPORTED_MODEL_TYPES = tuple(ARCHS)
FACTORIZED_PREFIX = "lowrank_"  # model_type of a factorized export: lowrank_<base model_type>


def model_type_of(model_or_config) -> Optional[str]:
    """The base ``model_type`` (a factorized export's ``lowrank_llama`` counts as ``llama``)."""
    config = getattr(model_or_config, "config", model_or_config)
    base = getattr(config, "lowrank_base_model_type", None)
    return base or getattr(config, "model_type", None)


def arch_of(model_or_config, strict: bool = True) -> Optional[ArchSpec]:
    """The :class:`ArchSpec` of a model or config; unknown types raise (or give None when not strict)."""
    model_type = model_type_of(model_or_config)
    spec = ARCHS.get(model_type)
    if spec is None and strict:
        config = getattr(model_or_config, "config", model_or_config)
        raise UnsupportedArchitectureError(
            f"unsupported architecture: model_type={model_type!r} "
            f"(architectures={getattr(config, 'architectures', None)}); "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return spec


def all_module_names() -> tuple[str, ...]:
    """Short names any supported architecture accepts in a plan (decoder linears, then heads)."""
    names: dict[str, None] = {}
    for spec in ARCHS.values():
        names.update(dict.fromkeys(spec.decoder_modules + spec.part_modules))
    names.update(dict.fromkeys(all_head_modules()))
    return tuple(names)


def all_head_modules() -> tuple[str, ...]:
    """Short names of the heads (``ArchSpec.head_module``) over every architecture: ``("lm_head",)``."""
    return tuple(dict.fromkeys(spec.head_module for spec in ARCHS.values()))


def all_groups() -> dict[str, tuple[str, ...]]:
    """Group name -> short names, over every architecture; ``all`` = every decoder linear."""
    groups: dict[str, dict] = {}
    for spec in ARCHS.values():
        for group, names in spec.groups.items():
            groups.setdefault(group, {}).update(dict.fromkeys(names))
        groups.setdefault("all", {}).update(dict.fromkeys(spec.decoder_modules))
    return {g: tuple(n) for g, n in groups.items()}
