"""The engine's value types: what a caller submits and what it gets back. No torch, no gRPC."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from plugboard_server.registry.store import AdapterRef


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"  # a stop sequence matched
    EOS = "eos"  # the model's end-of-sequence token
    CANCELLED = "cancelled"  # the caller went away or its deadline passed


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings. None means "the server's default"."""

    max_new_tokens: int | None = None
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerateInput:
    """One generation request: exactly one of prompt (raw text) and messages (chat template)."""

    prompt: str = ""
    messages: tuple[ChatMessage, ...] = ()
    adapter: AdapterRef | None = None  # the module version to apply; None = the base model
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""


@dataclass(frozen=True)
class ScoreInput:
    prompt: str = ""
    messages: tuple[ChatMessage, ...] = ()
    choices: tuple[str, ...] = ()
    adapter: AdapterRef | None = None
    request_id: str = ""


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class Timing:
    queue_seconds: float = 0.0
    prefill_seconds: float = 0.0
    total_seconds: float = 0.0
    first_token_seconds: float = 0.0


@dataclass(frozen=True)
class TokenDelta:
    """A streamed piece of output: new text (never a split character) and the tokens it covers."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    """The last event of a stream, carrying the output that came with the last token."""

    reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    timing: Timing
    delta: TokenDelta | None = None


@dataclass(frozen=True)
class GenerateResult:
    text: str
    reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    adapter: str
    request_id: str
    seed: int
    timing: Timing
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class ChoiceScore:
    choice: str
    logprob: float
    probability: float
    tokens: int


@dataclass(frozen=True)
class ScoreResult:
    scores: tuple[ChoiceScore, ...]
    best: str
    adapter: str
    prompt_tokens: int
    request_id: str


@dataclass(frozen=True)
class Tokenized:
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]


@dataclass(frozen=True)
class ModelInfo:
    model: str
    name: str
    fingerprint: str
    architecture: str
    dtype: str
    device: str
    quantization: str
    max_context_tokens: int
    max_input_tokens: int
    max_new_tokens: int
    default_max_new_tokens: int
    max_batch_size: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    has_chat_template: bool
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    adapter_kinds: tuple[str, ...]  # module kinds applied: "PREFIX", "PROMPT", "LORA"
    max_loaded_adapters: int
    max_lora_rank: int
    max_prefix_tokens: int
