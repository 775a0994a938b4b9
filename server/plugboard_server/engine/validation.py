"""Check a request against the engine's limits before it is queued; fill in the defaults."""

from __future__ import annotations

import math
from dataclasses import replace

from plugboard_server.engine.config import EngineConfig
from plugboard_server.engine.types import ChatMessage, SamplingParams
from plugboard_server.errors import InvalidRequest

_ROLES = ("system", "user", "assistant")
_MAX_SEED = 2**63 - 1


def check_input(prompt: str, messages: tuple[ChatMessage, ...], *, has_chat_template: bool) -> None:
    if prompt and messages:
        raise InvalidRequest("give either a prompt or messages, not both", field="prompt")
    if not prompt and not messages:
        raise InvalidRequest("empty: give a prompt or messages", field="prompt")
    if messages and not has_chat_template:
        raise InvalidRequest("this model has no chat template; send a raw prompt", field="messages")
    for i, m in enumerate(messages):
        if m.role not in _ROLES:
            raise InvalidRequest(f"role {m.role!r} is not one of {', '.join(_ROLES)}", field=f"messages[{i}]")


def resolve_params(params: SamplingParams, config: EngineConfig) -> SamplingParams:
    """Return params with defaults filled in, or raise InvalidRequest naming the bad field."""
    if params.max_new_tokens is None:
        max_new = min(config.default_max_new_tokens, config.max_new_tokens)
    else:
        max_new = params.max_new_tokens
    if max_new <= 0:
        raise InvalidRequest("must be at least 1", field="max_new_tokens")
    if max_new > config.max_new_tokens:
        raise InvalidRequest(
            f"{max_new} is over this server's limit of {config.max_new_tokens}", "max_new_tokens"
        )
    _finite(params.temperature, "temperature")
    if params.temperature < 0:
        raise InvalidRequest("must not be negative (0 = greedy)", field="temperature")
    _finite(params.top_p, "top_p")
    if not 0.0 < params.top_p <= 1.0:
        raise InvalidRequest("must lie in (0, 1]", field="top_p")
    if params.top_k < 0:
        raise InvalidRequest("must not be negative (0 = off)", field="top_k")
    _finite(params.repetition_penalty, "repetition_penalty")
    if params.repetition_penalty <= 0:
        raise InvalidRequest("must be greater than 0 (1 = off)", field="repetition_penalty")
    if params.seed is not None and not 0 <= params.seed <= _MAX_SEED:
        raise InvalidRequest(f"must lie in [0, {_MAX_SEED}]", field="seed")
    if len(params.stop) > config.max_stop_sequences:
        raise InvalidRequest(f"at most {config.max_stop_sequences} stop sequences", field="stop")
    for s in params.stop:
        if not s:
            raise InvalidRequest("a stop sequence is empty", field="stop")
        if len(s) > config.max_stop_length:
            raise InvalidRequest(f"a stop sequence is over {config.max_stop_length} characters", field="stop")
    return replace(params, max_new_tokens=max_new)


def check_lengths(prompt_tokens: int, max_new_tokens: int, *, max_input: int, max_context: int) -> None:
    if prompt_tokens == 0:
        raise InvalidRequest("the prompt has no tokens", field="prompt")
    if prompt_tokens > max_input:
        raise InvalidRequest(f"{prompt_tokens} tokens, over the limit of {max_input}", field="prompt")
    if prompt_tokens + max_new_tokens > max_context:
        raise InvalidRequest(
            f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) is over the model's "
            f"context of {max_context} tokens",
            field="max_new_tokens",
        )


def check_choices(choices: tuple[str, ...], config: EngineConfig) -> None:
    if len(choices) < 2:
        raise InvalidRequest("give at least two choices", field="choices")
    if len(choices) > config.max_score_choices:
        raise InvalidRequest(f"at most {config.max_score_choices} choices", field="choices")
    for i, c in enumerate(choices):
        if not c:
            raise InvalidRequest("a choice is empty", field=f"choices[{i}]")


def _finite(value: float, field: str) -> None:
    if not math.isfinite(value):
        raise InvalidRequest("must be a finite number", field=field)
