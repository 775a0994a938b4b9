"""The engine's limits and batching settings (the server's config builds one from its flags)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32  # rows in the running batch
    max_batch_tokens: int = 65536  # sum over running rows of prompt + max_new_tokens (KV cache budget)
    max_prefill_tokens: int = 8192  # padded tokens in one prefill forward
    max_queued_requests: int = 1024  # beyond this, new requests are refused as overloaded
    max_queued_tokens: int = 1 << 20  # prompt + max_new_tokens summed over waiting requests, likewise
    max_input_tokens: int = 0  # 0 = the model's context length minus 1
    max_new_tokens: int = 2048  # the most a request may ask for
    default_max_new_tokens: int = 256  # what a request gets when it does not say
    max_stop_sequences: int = 16
    max_stop_length: int = 256  # characters per stop sequence
    max_score_choices: int = 64
    max_loaded_adapters: int = 32  # device slots for modules
    max_host_adapters: int = 128  # module versions kept in host memory
    max_lora_rank: int = 16  # LoRA slot buffers are this wide
    max_prefix_tokens: int = 128  # virtual tokens of a prefix or soft prompt
