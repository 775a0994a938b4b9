"""Value types for modules: what a PEFT directory holds, in the layouts the engine applies directly."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class ModuleKind(enum.Enum):
    PREFIX = "PREFIX"  # prefix tuning / P-tuning v2: per-layer key/value prefixes
    PROMPT = "PROMPT"  # prompt tuning / P-tuning: virtual token embeddings
    LORA = "LORA"  # low-rank deltas on linear layers


@dataclass(frozen=True)
class ModelShape:
    """The base-model facts a module is validated against."""

    model_type: str  # config.model_type, e.g. "llama", "gpt2"
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    # Every linear layer a LoRA may target: module path (as in named_modules(), e.g.
    # "model.layers.0.self_attn.q_proj") -> (in_features, out_features). GPT-2's Conv1D included.
    linear_layers: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class AdapterLimits:
    max_lora_rank: int = 64
    max_prefix_tokens: int = 128  # virtual tokens of a prefix or a soft prompt


@dataclass(frozen=True)
class AdapterSpec:
    """What adapter_config.json (and the safetensors header) say, after validation."""

    kind: ModuleKind
    peft_type: str  # PREFIX_TUNING, PROMPT_TUNING, P_TUNING, LORA
    num_virtual_tokens: int = 0  # prefix / prompt
    rank: int = 0  # LoRA: the largest rank over its layers
    target_modules: tuple[str, ...] = ()  # LoRA: module paths it changes, sorted
    base_model_name: str = ""  # adapter_config's base_model_name_or_path, for information
    size_bytes: int = 0  # of the weights file


@dataclass
class PrefixWeights:
    # [num_layers, 2 (keys, values), kv_heads, num_virtual_tokens, head_dim], exactly PEFT's get_prompt
    # layout per layer, keys raw (no rotary applied: the model attends to cached keys as they are).
    kv: torch.Tensor


@dataclass
class PromptWeights:
    embeddings: torch.Tensor  # [num_virtual_tokens, hidden]: prepended to the input embeddings


@dataclass
class LoraLayer:
    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features, rank], already multiplied by the layer's scaling


@dataclass
class LoraWeights:
    layers: dict[str, LoraLayer]  # module path -> weights
    rank: int  # the largest rank over layers


@dataclass
class AdapterWeights:
    """A module read from disk and validated: exactly one of prefix / prompt / lora is set."""

    spec: AdapterSpec
    prefix: PrefixWeights | None = None
    prompt: PromptWeights | None = None
    lora: LoraWeights | None = None

    @property
    def kind(self) -> ModuleKind:
        return self.spec.kind

    @property
    def nbytes(self) -> int:
        tensors: list[torch.Tensor] = []
        if self.prefix is not None:
            tensors.append(self.prefix.kv)
        if self.prompt is not None:
            tensors.append(self.prompt.embeddings)
        if self.lora is not None:
            for layer in self.lora.layers.values():
                tensors += [layer.a, layer.b]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device, dtype: torch.dtype) -> AdapterWeights:
        if self.prefix is not None:
            self.prefix.kv = self.prefix.kv.to(device=device, dtype=dtype)
        if self.prompt is not None:
            self.prompt.embeddings = self.prompt.embeddings.to(device=device, dtype=dtype)
        if self.lora is not None:
            for layer in self.lora.layers.values():
                layer.a = layer.a.to(device=device, dtype=dtype)
                layer.b = layer.b.to(device=device, dtype=dtype)
        return self
