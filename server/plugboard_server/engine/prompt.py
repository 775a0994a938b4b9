"""Prompt text or chat messages -> token ids, the way every plugboard request is tokenized."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def encode_prompt(tokenizer: Any, prompt: str, messages: Sequence[Any]) -> list[int]:
    """Prompt text -> ids (no special tokens added), or messages (with .role, .content) through the chat
    template with its generation prompt."""
    if messages:
        ids = tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    return list(tokenizer.encode(prompt, add_special_tokens=False))
