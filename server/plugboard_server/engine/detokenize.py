"""Incremental detokenisation: turn a growing list of token ids into text deltas.

Decoding token by token splits multi-byte characters (a byte-level BPE token can hold half of an
emoji) and loses the spaces that some tokenizers attach to the following token. Like TGI and vLLM,
we decode a short window twice — with and without the newest tokens — and emit the difference only
when it does not end in U+FFFD (an incomplete character).
"""

from __future__ import annotations

from typing import Any

_CONTEXT_TOKENS = 5  # prompt tokens kept as left context so the first delta gets its spacing right
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self._tok = tokenizer
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # start of the window decoded as context
        self._read = len(self._ids)  # everything before this has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the new complete text (possibly "")."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            delta = new_text[len(prefix_text) :]
            # Slide the window and drop what it no longer needs, so each push costs O(window).
            drop = self._read
            self._ids = self._ids[drop:]
            self._prefix, self._read = 0, len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character at the very end)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
