"""RegisterAdapter uploads: what the server accepts and refuses, before anything reaches the registry."""

from __future__ import annotations

import hashlib

import pytest

from plugboard_server.errors import InvalidRequest, StorageError
from plugboard_server.service.upload import UploadAssembler

CONFIG = b'{"peft_type": "LORA"}'
WEIGHTS = bytes(range(256)) * 8


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_chunks_in_any_order_assemble_the_files(tmp_path):
    up = UploadAssembler(tmp_path, [("adapter_model.safetensors", len(WEIGHTS), _sha(WEIGHTS))], 1 << 20)
    up.add("adapter_model.safetensors", 1024, WEIGHTS[1024:])
    up.add("adapter_config.json", 0, CONFIG)
    up.add("adapter_model.safetensors", 0, WEIGHTS[:1024])
    up.finish()
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == WEIGHTS
    assert (tmp_path / "adapter_config.json").read_bytes() == CONFIG


@pytest.mark.parametrize(
    "name",
    [
        "adapter_model.bin",
        "model.pt",
        "notes.txt",
        "../adapter_config.json",
        "sub/adapter_model.safetensors",
        ".hidden.safetensors",
    ],
)
def test_only_config_and_safetensors_files(tmp_path, name):
    up = UploadAssembler(tmp_path, [], 1 << 20)
    with pytest.raises(InvalidRequest):
        up.add(name, 0, b"x")
    assert not any(tmp_path.iterdir())


def test_a_file_listed_twice_or_sent_twice_is_refused(tmp_path):
    with pytest.raises(InvalidRequest, match="listed twice"):
        UploadAssembler(tmp_path, [("adapter_config.json", 0, ""), ("adapter_config.json", 0, "")], 1 << 20)
    up = UploadAssembler(tmp_path, [], 1 << 20)
    up.add("adapter_config.json", 0, CONFIG)
    with pytest.raises(InvalidRequest, match="overlap"):
        up.add("adapter_config.json", 0, CONFIG)


def test_size_limits(tmp_path):
    with pytest.raises(InvalidRequest, match="upload limit"):
        UploadAssembler(tmp_path, [("adapter_model.safetensors", 2048, "")], 1024)
    up = UploadAssembler(tmp_path, [], 1024)
    up.add("adapter_config.json", 0, CONFIG)
    with pytest.raises(InvalidRequest, match="upload limit"):
        up.add("adapter_model.safetensors", 0, WEIGHTS)


def test_offsets_past_the_limit_and_long_names_are_refused_before_any_file_is_made(tmp_path):
    up = UploadAssembler(tmp_path, [], 1024)
    for offset in (1024, 2**44, 2**63, 2**64 - 1):  # a huge offset would make a huge sparse file
        with pytest.raises(InvalidRequest, match="upload limit"):
            up.add("adapter_model.safetensors", offset, b"x")
    with pytest.raises(InvalidRequest, match="over 128 characters"):
        up.add("a" * 300 + ".safetensors", 0, b"x")
    assert not any(tmp_path.iterdir())


def test_incomplete_or_wrong_uploads_fail_at_finish(tmp_path):
    def assembled(manifest, chunks):
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        up = UploadAssembler(d, manifest, 1 << 20)
        for name, offset, data in chunks:
            up.add(name, offset, data)
        return up

    with pytest.raises(InvalidRequest, match=r"no adapter_config\.json"):
        assembled([], [("adapter_model.safetensors", 0, WEIGHTS)]).finish()
    with pytest.raises(InvalidRequest, match=r"no \.safetensors"):
        assembled([], [("adapter_config.json", 0, CONFIG)]).finish()
    with pytest.raises(InvalidRequest, match="gaps"):
        assembled(
            [], [("adapter_config.json", 0, CONFIG), ("adapter_model.safetensors", 100, WEIGHTS)]
        ).finish()
    with pytest.raises(InvalidRequest, match="checksum"):
        assembled(
            [("adapter_model.safetensors", 0, "0" * 64)],
            [("adapter_config.json", 0, CONFIG), ("adapter_model.safetensors", 0, WEIGHTS)],
        ).finish()
    with pytest.raises(InvalidRequest, match="declared"):
        assembled(
            [("adapter_model.safetensors", len(WEIGHTS) + 1, "")],
            [("adapter_config.json", 0, CONFIG), ("adapter_model.safetensors", 0, WEIGHTS)],
        ).finish()


@pytest.mark.parametrize("budget", [0, 100, 1500])
def test_a_full_disk_while_assembling_is_storage_full(tmp_path, monkeypatch, budget):
    import errno
    import os

    from plugboard_server.errors import StorageFull
    from tests.support.faults import DiskFills

    up = UploadAssembler(tmp_path, [], 1 << 20)
    monkeypatch.setattr(os, "pwrite", DiskFills(tmp_path, budget))
    with pytest.raises(StorageFull, match="the registry's disk is full") as raised:
        up.add("adapter_config.json", 0, CONFIG)
        up.add("adapter_model.safetensors", 0, WEIGHTS)
    assert str(tmp_path) in str(raised.value) and os.strerror(errno.ENOSPC) in str(raised.value)
    monkeypatch.setattr(os, "pwrite", DiskFills(tmp_path, 0, errno.EIO))
    with pytest.raises(StorageError, match="Input/output error"):
        up.add("adapter_model.safetensors", 4096, b"more")
