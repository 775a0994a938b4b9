"""Load a validated PEFT module's tensors into the layouts the engine applies (types.AdapterWeights)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from plugboard_server.adapters.formats import WEIGHTS_FILE, ModuleLayout, inspect_module
from plugboard_server.adapters.types import (
    AdapterLimits,
    AdapterWeights,
    LoraLayer,
    LoraWeights,
    ModelShape,
    ModuleKind,
    PrefixWeights,
    PromptWeights,
)
from plugboard_server.errors import IncompatibleAdapter


def read_adapter(
    path: Path,
    shape: ModelShape,
    limits: AdapterLimits,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> AdapterWeights:
    """Validate the module at `path` (nothing is loaded if that fails), then load and convert its tensors."""
    layout = inspect_module(Path(path), shape, limits)
    # safetensors.torch.load_file parses a JSON header and copies raw buffers: no pickle involved.
    tensors = load_file(str(layout.weights_file), device="cpu")
    found = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    if found != layout.tensor_shapes:
        raise IncompatibleAdapter(f"{WEIGHTS_FILE} changed while it was being read; load the module again")
    spec = layout.spec
    weights = AdapterWeights(spec=spec)
    if spec.kind is ModuleKind.PREFIX:
        weights.prefix = PrefixWeights(kv=_prefix_kv(tensors["prompt_embeddings"], shape))
    elif spec.kind is ModuleKind.PROMPT:
        weights.prompt = PromptWeights(embeddings=tensors["prompt_embeddings"])
    else:
        weights.lora = _lora(tensors, layout)
    return weights.to(torch.device(device), dtype)


def _prefix_kv(embeddings: torch.Tensor, shape: ModelShape) -> torch.Tensor:
    """[P, L*2*H_kv*D] -> [L, 2, H_kv, P, D], as PEFT's get_prompt builds the per-layer key/value cache.

    get_prompt does view(B, P, L*2, H, D).permute(2, 0, 3, 1, 4).split(2): row 2i of the L*2 axis is
    layer i's keys and row 2i+1 its values. Validation has checked that the sizes agree.
    """
    tokens = embeddings.shape[0]
    layers, heads, head_dim = shape.num_layers, shape.num_key_value_heads, shape.head_dim
    kv = embeddings.view(tokens, layers * 2, heads, head_dim).permute(1, 2, 0, 3)
    return kv.reshape(layers, 2, heads, tokens, head_dim).contiguous()


def _lora(tensors: dict[str, torch.Tensor], layout: ModuleLayout) -> LoraWeights:
    layers = {}
    for path, layer in layout.lora_layers.items():
        b = tensors[layer.b_key]
        # Scale in at least float32 so a bf16 / fp16 module is rounded once, after scaling, not twice.
        wide = torch.promote_types(b.dtype, torch.float32)
        layers[path] = LoraLayer(a=tensors[layer.a_key], b=(b.to(wide) * layer.scaling))
    return LoraWeights(layers=layers, rank=layout.spec.rank)
