"""Shared fixtures: tiny models built in-process, loaded through the server's own loading code."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.tiny_model import build_llama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GQA Llama (4 query heads over 2 KV heads) with a byte-level BPE tokenizer."""
    return build_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path):
    """The tiny model loaded once, frozen; read-only, so tests may share it."""
    from plugboard_server.models.loading import load_model

    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2 (fused c_attn, Conv1D layers, 4 heads) with the same tokenizer."""
    from tests.support.tiny_model import build_gpt2

    return build_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_dir: Path):
    """The tiny GPT-2 loaded once, frozen; read-only, so tests may share it."""
    from plugboard_server.models.loading import load_model

    return load_model(str(tiny_gpt2_dir), device="cpu")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3-compatible server on 127.0.0.1, for the object-store registry (one per session)."""
    from tests.support.s3 import CREDENTIALS, s3_server

    for key, value in CREDENTIALS.items():
        os.environ.setdefault(key, value)
    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on the local S3 server."""
    from tests.support.s3 import new_bucket

    return new_bucket(s3_endpoint)
