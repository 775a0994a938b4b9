"""A base model's fingerprint: its name plus a hash of its config and tokenizer.

Modules are trained on one base model and are only valid on it; the fingerprint is what they are
checked against. dtype, device and quantization are left out: a module fits all of them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Config keys that differ between copies of the same model without changing what it computes.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "quantization_config",
    "use_cache",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "_experts_implementation",
    "architectures",
}


def config_digest(config: Any) -> str:
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted(str(t) for t in tokenizer.all_special_tokens)
    payload = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def fingerprint(name: str, config: Any, tokenizer: Any) -> str:
    h = hashlib.sha256((config_digest(config) + tokenizer_digest(tokenizer)).encode()).hexdigest()
    return f"{name}:{h[:16]}"
