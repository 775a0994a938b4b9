"""The server on a failing registry disk, and a version deleted under a request: clean errors, no debris.

A full disk is injected (tests.support.faults.DiskFills in place of os.pwrite, the one call that
writes module bytes): a real ENOSPC needs a small filesystem, which CI may not allow.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from plugboard_client import Client, Internal, NotFound, ResourceExhausted
from plugboard_server.errors import StorageFull
from plugboard_server.models.loading import load_model
from plugboard_server.registry.local import LocalStore, verify_files
from tests.support import peft_modules as pm
from tests.support.faults import DiskFills
from tests.support.server import ServerThread, server_config

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def modules(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fault-modules")
    return {
        "lora": pm.lora(tiny_model_dir, root / "lora", r=4, seed=21),
        "prefix": pm.prefix(tiny_model_dir, root / "prefix", tokens=4, seed=22),
    }


@pytest.fixture(scope="module")
def srv(tiny_model_dir, tmp_path_factory, modules):
    server = ServerThread(
        server_config(registry=tmp_path_factory.mktemp("faults") / "registry"),
        loader=lambda: load_model(str(tiny_model_dir)),
    ).start()
    with Client(server.target, timeout=60) as c:
        c.register_adapter(modules["prefix"], name="steady")  # serves throughout
    yield server
    server.stop()


@pytest.fixture
def client(srv):
    with Client(srv.target, timeout=60) as c:
        yield c


def _text(c: Client, adapter: str) -> tuple[str, str]:
    r = c.generate(PROMPT, adapter=adapter, max_new_tokens=8, ignore_eos=True)
    return r.text, r.adapter


def _root(srv: ServerThread) -> Path:
    return Path(srv.server.config.registry)


def _assert_no_debris(srv: ServerThread, name: str) -> None:
    """No version, no staging directory, no version directory of `name`, and the index agrees."""
    root = _root(srv)
    assert list((root / "staging").iterdir()) == []
    assert not (root / "modules" / name).exists() or not any((root / "modules" / name).iterdir())
    assert all(r.name != name for r in srv.server.store.list())
    for ref in srv.server.store.list():
        verify_files(ref)


def _size(directory: Path) -> int:
    """Bytes of what an upload sends (and a publish copies): the config and the weights."""
    return sum(p.stat().st_size for p in directory.iterdir() if p.suffix in (".json", ".safetensors"))


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.99], ids=["at-once", "half-way", "last-bytes"])
def test_a_full_disk_during_an_upload_is_resource_exhausted_and_stores_nothing(
    srv, client, modules, monkeypatch, fraction
):
    name = f"upload-{int(fraction * 100)}"
    steady = _text(client, "steady")
    full = DiskFills(_root(srv), int(_size(modules["lora"]) * fraction))
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(ResourceExhausted) as raised:
        client.register_adapter(modules["lora"], name=name, alias="stable")
    assert full.refused >= 1
    details = raised.value.details
    assert "the registry's disk is full (No space left on device)" in details
    assert str(_root(srv) / "staging") in details  # where: the file being written
    assert raised.value.retry_after is None  # not "overloaded": retrying needs space freed first
    _assert_no_debris(srv, name)
    with pytest.raises(NotFound):
        client.get_adapter(name)
    assert _text(client, "steady") == steady  # the server keeps serving the others
    monkeypatch.undo()  # space freed: the same upload succeeds
    info = client.register_adapter(modules["lora"], name=name, alias="stable")
    assert (info.version, sorted(info.aliases)) == (1, ["latest", "stable"])
    assert _text(client, f"{name}@stable")[1] == f"{name}@1"


def test_a_full_disk_while_the_registry_copies_a_module_in(srv, client, modules, monkeypatch):
    """LocalStore.publish from a directory (what --adapters-dir import does): the copy fills the disk."""
    store: LocalStore = srv.server.store
    facts = srv.server.engine.describe_module(modules["lora"])
    steady = _text(client, "steady")
    for budget in (0, _size(modules["lora"]) // 2):
        monkeypatch.setattr(os, "pwrite", DiskFills(_root(srv), budget, errno.EDQUOT))
        with pytest.raises(StorageFull) as raised:
            store.publish("copied", modules["lora"], facts)
        assert "the registry's disk is full (Disk quota exceeded)" in str(raised.value)
        assert str(_root(srv)) in str(raised.value)
        _assert_no_debris(srv, "copied")
        assert _text(client, "steady") == steady
        monkeypatch.undo()
    assert store.publish("copied", modules["lora"], facts).version == 1
    assert _text(client, "copied")[1] == "copied@1"


def test_other_write_errors_during_an_upload_are_a_clean_internal_error(srv, client, modules, monkeypatch):
    monkeypatch.setattr(os, "pwrite", DiskFills(_root(srv), 100, errno.EIO))
    with pytest.raises(Internal, match=r"writing to the registry failed \(Input/output error\)"):
        client.register_adapter(modules["lora"], name="eio")
    _assert_no_debris(srv, "eio")
    monkeypatch.undo()
    assert client.register_adapter(modules["lora"], name="eio").version == 1


def test_a_version_deleted_after_the_request_resolved_it_is_not_found(srv, client, modules, monkeypatch):
    """The race: `name@alias` resolves to a version, which is deleted before its files are read."""
    client.register_adapter(modules["lora"], name="doomed")
    client.register_adapter(modules["prefix"], name="doomed")
    client.set_alias("doomed", "prod", 2)
    store: LocalStore = srv.server.store
    real_get = store.get

    def get_then_delete(ref: str):
        version = real_get(ref)
        if ref == "doomed@prod":
            store.delete("doomed", version.version, force=True)  # rows and files gone
        return version

    monkeypatch.setattr(store, "get", get_then_delete)
    with pytest.raises(NotFound, match=r"module doomed@2 was deleted"):
        client.generate(PROMPT, adapter="doomed@prod", max_new_tokens=2)
    monkeypatch.undo()
    assert _text(client, "doomed")[1] == "doomed@1"  # latest fell back to the version left
    sample = {"tier": "disk", "outcome": "deleted"}
    assert srv.server.metrics.registry.get_sample_value("plugboard_adapter_loads_total", sample) == 1
