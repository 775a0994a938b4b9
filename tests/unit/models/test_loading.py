from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from plugboard_server.errors import ModelLoadError
from plugboard_server.models import gguf
from plugboard_server.models.fingerprint import fingerprint
from plugboard_server.models.loading import load_model, resolve_dtype


def test_a_loaded_model_is_frozen_and_described(tiny_model):
    m = tiny_model
    assert not m.model.training
    assert not any(p.requires_grad for p in m.model.parameters())
    assert (m.num_layers, m.num_attention_heads, m.num_key_value_heads, m.head_dim) == (2, 4, 2, 16)
    assert m.eos_token_ids == (m.tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    assert m.has_chat_template and m.name == "tiny-llama-s0"
    assert m.fingerprint.startswith("tiny-llama-s0:")


def test_fingerprint_ignores_dtype_but_not_weights_shape_or_vocab(tiny_model, tiny_model_dir):
    bf16 = load_model(str(tiny_model_dir), dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    assert bf16.fingerprint == tiny_model.fingerprint
    other = tiny_model.config.__class__(**{**tiny_model.config.to_dict(), "num_hidden_layers": 3})
    assert fingerprint("tiny-llama-s0", other, tiny_model.tokenizer) != tiny_model.fingerprint


def test_unknown_models_and_options_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="offline"):
        load_model("no-such-org/no-such-model")
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"), cache_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="dtype"):
        resolve_dtype("float8", torch.device("cpu"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="not a model directory"):
        load_model(str(tmp_path / "file.txt"))


def test_auto_dtype_is_float32_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_gguf_conversion_happens_once_and_is_atomic(tmp_path, tiny_model_dir, monkeypatch):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF-placeholder")
    calls = []

    def fake_convert(path: Path, out: Path, name: str) -> None:
        calls.append(path)
        for f in tiny_model_dir.iterdir():
            shutil.copy(f, out / f.name)
        (out / gguf.MARKER).write_text(json.dumps({"name": name}))

    monkeypatch.setattr(gguf, "_convert", fake_convert)
    first = gguf.ensure_converted(source, tmp_path / "cache", name="my-model")
    second = gguf.ensure_converted(source, tmp_path / "cache", name="my-model")
    assert first == second and len(calls) == 1
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".converting-")]
    assert load_model(str(source), cache_dir=tmp_path / "cache").name == "my-model"


def test_an_interrupted_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF-placeholder")

    def failing_convert(path: Path, out: Path, name: str) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise ModelLoadError("boom")

    monkeypatch.setattr(gguf, "_convert", failing_convert)
    with pytest.raises(ModelLoadError):
        gguf.ensure_converted(source, tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []
