"""Load the frozen base model and its tokenizer from a model spec, with dtype, device and quantization."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plugboard_server.errors import ModelLoadError
from plugboard_server.models import default as default_model
from plugboard_server.models.fingerprint import fingerprint
from plugboard_server.models.gguf import default_cache_dir, ensure_converted, read_marker

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = ("none", "int8", "nf4")


@dataclass
class LoadedModel:
    """A frozen causal LM ready for inference, with the facts the rest of the server needs."""

    model: Any  # a transformers PreTrainedModel in eval mode with gradients off
    tokenizer: Any
    spec: str  # what --model named
    name: str
    fingerprint: str
    dtype: torch.dtype
    device: torch.device
    quantization: str
    load_seconds: float

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def architecture(self) -> str:
        archs = getattr(self.config, "architectures", None) or [type(self.model).__name__]
        return archs[0]

    @property
    def max_context(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 0) or 2048)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def num_attention_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def num_key_value_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.num_attention_heads)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.config, "head_dim", None) or self.hidden_size // self.num_attention_heads)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.config):
            eos = getattr(source, "eos_token_id", None) if source is not None else None
            if isinstance(eos, int):
                ids.add(eos)
            elif eos:
                ids.update(int(e) for e in eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return tuple(sorted(ids))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} asked for, but no CUDA device is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise ModelLoadError(f"unknown device {device!r}: use auto, cpu or cuda[:N]")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # exact on CPU; bfloat16 is faster on AMX CPUs but changes some outputs
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_source(spec: str, cache_dir: Path) -> tuple[str, str]:
    """Map a model spec to (a directory or hub id that from_pretrained reads offline, a display name)."""
    if spec == default_model.DEFAULT_MODEL:
        return str(default_model.provision(cache_dir)), default_model.DEFAULT_MODEL_NAME
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        path = ensure_converted(path, cache_dir)
    if path.is_dir():
        marker = read_marker(path)
        return str(path), (marker or {}).get("name") or path.resolve().name
    if path.exists():
        raise ModelLoadError(f"{spec}: not a model directory or a .gguf file")
    return spec, spec  # a hub id: only a copy already in the local cache is used


def _quantization_config(quantize: str, dtype: torch.dtype) -> Any:
    if quantize == "none":
        return None
    if quantize not in QUANTIZATIONS:
        raise ModelLoadError(f"unknown quantization {quantize!r}: use {', '.join(QUANTIZATIONS)}")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise ModelLoadError("--quantize needs bitsandbytes: pip install 'plugboard[quantize]'") from exc
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def load_model(
    spec: str = default_model.DEFAULT_MODEL,
    *,
    dtype: str = "auto",
    device: str = "auto",
    quantize: str = "none",
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load `spec` (default, a directory, a .gguf file or a hub id in the local cache), frozen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    source, name = resolve_source(spec, cache_dir or default_cache_dir())
    quant = _quantization_config(quantize, torch_dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": True}
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": str(dev)})
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise ModelLoadError(f"cannot load model {spec!r} (looked offline only): {exc}") from exc
    if quant is None:
        model.to(dev)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        name=name,
        fingerprint=fingerprint(name, model.config, tokenizer),
        dtype=torch_dtype,
        device=dev,
        quantization=quantize,
        load_seconds=time.perf_counter() - start,
    )
    log.info(
        "loaded %s (%s) on %s as %s in %.2fs",
        name,
        loaded.fingerprint,
        dev,
        str(torch_dtype).removeprefix("torch."),
        loaded.load_seconds,
    )
    return loaded
