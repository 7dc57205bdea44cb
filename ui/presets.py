"""Preset plans for the Budget page: the seed's scenarios, expressed for any layer count."""
from __future__ import annotations


def preset_plans(n_layers: int) -> dict[str, str]:
    """Name -> compact plan string. For a 32-layer Mistral-7B these are the seed's exact scenarios."""
    last = n_layers - 1
    presets = {"All linears at rank 16 (with lm_head)": "all:r16; lm_head:r16",
               "Attention only, rank 16": "attn:r16"}
    if n_layers > 7:
        presets[f"Seed: attention of layers 6-{last} at rank 16"] = f"6-{last}:attn:r16"
        presets[f"Seed: that + MLP of layers 0-6 at rank 16"] = f"6-{last}:attn:r16; 0-6:mlp:r16"
    mlp_layer = 17 if n_layers > 17 else n_layers // 2
    presets[f"Seed experiment 3: MLP of layer {mlp_layer} at rank 16"] = f"{mlp_layer}:mlp:r16"
    return presets
