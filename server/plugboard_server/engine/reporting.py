"""What the engine reports: the model's description, and the metrics and log line of a finished request."""

from __future__ import annotations

import logging

from plugboard_server.adapters.types import ModuleKind
from plugboard_server.engine.config import EngineConfig
from plugboard_server.engine.sequence import Sequence
from plugboard_server.engine.types import Finished, ModelInfo
from plugboard_server.metrics import Metrics
from plugboard_server.models.loading import LoadedModel

log = logging.getLogger("plugboard_server.engine.engine")  # the request log keeps its documented name


def model_info(m: LoadedModel, config: EngineConfig, max_input_tokens: int) -> ModelInfo:
    return ModelInfo(
        model=m.spec,
        name=m.name,
        fingerprint=m.fingerprint,
        architecture=m.architecture,
        dtype=str(m.dtype).removeprefix("torch."),
        device=str(m.device),
        quantization=m.quantization,
        max_context_tokens=m.max_context,
        max_input_tokens=max_input_tokens,
        max_new_tokens=config.max_new_tokens,
        default_max_new_tokens=config.default_max_new_tokens,
        max_batch_size=config.max_batch_size,
        vocab_size=m.vocab_size,
        eos_token_ids=m.eos_token_ids,
        has_chat_template=m.has_chat_template,
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads,
        head_dim=m.head_dim,
        adapter_kinds=tuple(k.value for k in ModuleKind),
        max_loaded_adapters=config.max_loaded_adapters,
        max_lora_rank=config.max_lora_rank,
        max_prefix_tokens=config.max_prefix_tokens,
    )


def record_finish(m: Metrics, seq: Sequence, fin: Finished) -> None:
    t = fin.timing
    m.finished.labels(fin.reason.value).inc()
    m.prompt_tokens.inc(fin.prompt_tokens)
    m.generated_tokens.inc(fin.generated_tokens)
    m.request_prompt_tokens.observe(fin.prompt_tokens)
    m.request_generated_tokens.observe(fin.generated_tokens)
    label = m.module_label(seq.adapter)
    m.adapter_requests.labels(label).inc()
    m.adapter_generated_tokens.labels(label).inc(fin.generated_tokens)
    if seq.clock.admitted is not None:
        m.queue_duration.observe(t.queue_seconds)
    if seq.clock.first_token is not None:
        m.time_to_first_token.observe(t.first_token_seconds)
        if fin.generated_tokens > 1:
            decode_time = t.total_seconds - t.first_token_seconds
            m.time_per_output_token.observe(decode_time / (fin.generated_tokens - 1))
    log.info(
        "request_id=%s adapter=%s outcome=%s prompt_tokens=%d generated_tokens=%d total_s=%.3f",
        seq.request_id,
        seq.adapter or "-",
        fin.reason.value,
        fin.prompt_tokens,
        fin.generated_tokens,
        t.total_seconds,
    )
