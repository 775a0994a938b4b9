"""Fixtures for the registry tests: a LocalStore on a temporary root, and fake module directories."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from plugboard_server.registry.local import LocalStore
from plugboard_server.registry.store import ModuleFacts

LORA = ModuleFacts("LORA", "LORA", "base-fingerprint", rank=8, target_modules=("q_proj", "v_proj"))
PREFIX = ModuleFacts("PREFIX", "PREFIX_TUNING", "base-fingerprint", num_virtual_tokens=10)

MakeModule = Callable[..., Path]


def write_module(path: Path, size: int = 256) -> Path:
    """A fake PEFT module: the store does not parse the contents, so random bytes will do."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (path / "adapter_model.safetensors").write_bytes(os.urandom(size))
    return path


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalStore]:
    s = LocalStore(tmp_path / "registry")
    yield s
    s.close()


@pytest.fixture
def make_module(tmp_path: Path) -> MakeModule:
    counter = iter(range(1_000_000))

    def make(size: int = 256) -> Path:
        return write_module(tmp_path / "sources" / f"m{next(counter)}", size)

    return make
