"""Describe a loaded base model as the ModelShape that modules are validated against."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from plugboard_server.adapters.types import ModelShape

# Output layers and embeddings are never LoRA targets here (embedding LoRA is not supported).
_EXCLUDED = ("lm_head", "embed_out", "wte", "wpe", "embed_tokens", "score")


def linear_in_out(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of an nn.Linear or a GPT-2 Conv1D (weight stored [in, out])."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    wrapped = getattr(module, "base", None)  # a layer an earlier engine on this model wrapped for LoRA
    if isinstance(wrapped, nn.Module):
        return linear_in_out(wrapped)
    return None


def model_shape(model: Any) -> ModelShape:
    config = model.config
    heads = int(getattr(config, "num_attention_heads", None) or config.n_head)
    hidden = int(getattr(config, "hidden_size", None) or config.n_embd)
    layers = int(getattr(config, "num_hidden_layers", None) or config.n_layer)
    linear = {}
    for name, module in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        if leaf in _EXCLUDED or (leaf == "base" and parent in linear):  # the wrapped layer, seen above
            continue
        dims = linear_in_out(module)
        if dims is not None:
            linear[name] = dims
    return ModelShape(
        model_type=str(config.model_type),
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
        linear_layers=linear,
    )
