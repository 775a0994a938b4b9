"""The registry through the real server: publish, versions, aliases, hot swap, deletion, tiers, auth."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from plugboard.v1 import adapters_pb2 as apb
from plugboard_client import (
    Client,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from plugboard_server.models.loading import load_model
from tests.support import peft_modules as pm
from tests.support.server import ServerThread, server_config

TOKEN = "s3cret-admin-token"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def modules(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("upload")
    return {
        "lora-v1": pm.lora(tiny_model_dir, root / "lora-v1", r=4, seed=11),
        "lora-v2": pm.lora(tiny_model_dir, root / "lora-v2", r=4, seed=12),
        "prefix-v1": pm.prefix(tiny_model_dir, root / "prefix-v1", tokens=4, seed=13),
        "prefix-v2": pm.prefix(tiny_model_dir, root / "prefix-v2", tokens=4, seed=14),
    }


@pytest.fixture
def registry_server(tiny_model_dir, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    srv = ServerThread(
        server_config(registry=tmp_path / "registry", admin_token_file=token_file, max_loaded_adapters=4),
        loader=lambda: load_model(str(tiny_model_dir)),
    ).start()
    yield srv
    srv.stop()


def _admin(srv: ServerThread) -> Client:
    return Client(srv.target, timeout=60, token=TOKEN)


def _text(c: Client, adapter: str, n: int = 12) -> tuple[str, str]:
    r = c.generate(PROMPT, adapter=adapter, max_new_tokens=n, ignore_eos=True)
    return r.text, r.adapter


def test_publish_versions_aliases_rollback_and_delete(registry_server, modules):
    with _admin(registry_server) as c:
        v1 = c.register_adapter(
            modules["lora-v1"],
            name="sentiment",
            tags=["demo"],
            description="first",
            metadata={"accuracy": 0.9},
        )
        assert (v1.name, v1.version, v1.kind, v1.ref) == ("sentiment", 1, apb.LORA, "sentiment@1")
        assert v1.metadata["accuracy"] == pytest.approx(0.9) and list(v1.tags) == ["demo"]
        assert set(v1.sha256) == {"adapter_config.json", "adapter_model.safetensors"}
        first, served_by = _text(c, "sentiment")
        assert served_by == "sentiment@1"
        v2 = c.register_adapter(modules["lora-v2"], name="sentiment", alias="canary")
        assert v2.version == 2 and "canary" in v2.aliases and "latest" in v2.aliases
        second, served_by = _text(c, "sentiment")
        assert served_by == "sentiment@2" and second != first
        assert _text(c, "sentiment@1") == (first, "sentiment@1")
        assert _text(c, "sentiment@canary") == (second, "sentiment@2")
        c.set_alias("sentiment", "stable", 2)
        assert _text(c, "sentiment@stable")[1] == "sentiment@2"
        c.set_alias("sentiment", "stable", 1)  # rollback: move the alias back
        assert _text(c, "sentiment@stable") == (first, "sentiment@1")
        with pytest.raises(FailedPrecondition, match="stable"):
            c.delete_adapter("sentiment@1")  # an alias points at it
        assert list(c.delete_adapter("sentiment@1", force=True).deleted) == ["sentiment@1"]
        with pytest.raises(NotFound):
            c.generate(PROMPT, adapter="sentiment@1", max_new_tokens=2)
        assert c.get_adapter("sentiment").version == 2
        listed = c.list_adapters(all_versions=True)
        assert [a.ref for a in listed.adapters] == ["sentiment@2"]
        assert list(c.delete_adapter("sentiment", force=True).deleted) == ["sentiment@2"]
        assert not c.list_adapters().adapters


def test_hot_swap_while_a_stream_runs(registry_server, modules):
    with _admin(registry_server) as c:
        c.register_adapter(modules["prefix-v1"], name="swap")
        expected_v1 = c.generate(PROMPT, adapter="swap", max_new_tokens=200, ignore_eos=True)
        stream = c.generate_stream(PROMPT, adapter="swap", max_new_tokens=200, ignore_eos=True)
        pieces = [next(stream)]
        c.register_adapter(modules["prefix-v2"], name="swap")  # published mid-stream
        assert _text(c, "swap")[1] == "swap@2"  # the next request gets the new version at once
        c.delete_adapter("swap@1")  # even deleting the running version does not break the stream
        pieces.extend(stream)
        assert pieces[-1].adapter == "swap@1"
        assert "".join(p.text for p in pieces) == expected_v1.text


def test_load_pins_and_unload_evicts(registry_server, modules):
    with _admin(registry_server) as c:
        c.register_adapter(modules["lora-v1"], name="pinned")
        assert c.get_adapter("pinned").residency == apb.DISK
        info = c.load_adapter("pinned")
        assert (info.residency, info.pinned) == (apb.DEVICE, True)
        manager = registry_server.server.engine.adapters
        assert manager.slot_map()["pinned@1"][2] is True
        info = c.unload_adapter("pinned")
        assert (info.residency, info.pinned) == (apb.DISK, False)
        assert "pinned@1" not in manager.slot_map()
        _text(c, "pinned")
        assert c.get_adapter("pinned").residency == apb.DEVICE  # used, idle, still warm
    metrics = _scrape(registry_server.metrics_url)
    assert metrics['plugboard_adapter_loads_total{outcome="ok",tier="disk"}'] >= 2
    assert metrics['plugboard_adapter_evictions_total{tier="device"}'] >= 1
    assert metrics['plugboard_adapter_resident{adapter="pinned@1",tier="device"}'] == 1
    assert metrics['plugboard_adapter_requests_total{adapter="pinned"}'] == 1
    assert metrics["plugboard_registry_versions"] == 1


def _scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        name: float(value)
        for name, _, value in (line.rpartition(" ") for line in text.splitlines() if line and line[0] != "#")
    }


def test_admin_calls_need_the_token_and_generation_does_not(registry_server, modules):
    with Client(registry_server.target, timeout=30) as anonymous:
        with pytest.raises(Unauthenticated):
            anonymous.register_adapter(modules["lora-v1"], name="nope")
        with pytest.raises(Unauthenticated):
            anonymous.delete_adapter("nope")
        assert anonymous.list_adapters().adapters == []  # reading needs no token
        assert anonymous.generate(PROMPT, max_new_tokens=2).generated_tokens == 2
    with Client(registry_server.target, timeout=30, token="wrong") as wrong, pytest.raises(PermissionDenied):
        wrong.set_alias("x", "stable", 1)


def _bad_dir(tmp_path: Path, source: Path, name: str, edit: Callable[[Path], object]) -> Path:
    target = tmp_path / name
    shutil.copytree(source, target)
    edit(target)
    return target


def test_bad_uploads_are_refused_and_nothing_is_stored(registry_server, modules, tmp_path, tiny_model_dir):
    lora = modules["lora-v1"]
    with _admin(registry_server) as c:
        with pytest.raises(InvalidArgument, match="name"):
            c.register_adapter(lora, name="../escape")
        with pytest.raises(InvalidArgument):
            c.register_adapter(lora, name="a/b")
        with pytest.raises(FailedPrecondition, match="safetensors"):
            corrupt = _bad_dir(
                tmp_path,
                lora,
                "corrupt",
                lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00garbage"),
            )
            c.register_adapter(corrupt, name="corrupt")
        with pytest.raises(FailedPrecondition, match="peft_type"):
            other = _bad_dir(
                tmp_path,
                lora,
                "ia3",
                lambda d: (d / "adapter_config.json").write_text(
                    json.dumps({**json.loads((d / "adapter_config.json").read_text()), "peft_type": "IA3"})
                ),
            )
            c.register_adapter(other, name="ia3")
        assert c.list_adapters().adapters == []
        assert c.generate(PROMPT, max_new_tokens=2).generated_tokens == 2
    staging = Path(registry_server.server.config.registry) / "staging"
    assert not staging.exists() or not any(staging.iterdir())


def test_a_replica_on_the_same_registry_serves_what_another_published(
    registry_server, modules, tiny_model_dir
):
    replica = ServerThread(
        server_config(registry=registry_server.server.config.registry),
        loader=lambda: load_model(str(tiny_model_dir)),
    ).start()
    try:
        with _admin(registry_server) as c, Client(replica.target, timeout=60) as r:
            c.register_adapter(modules["prefix-v1"], name="shared")
            assert _text(r, "shared") == _text(c, "shared")
            c.register_adapter(modules["prefix-v2"], name="shared")
            assert _text(r, "shared")[1] == "shared@2"
    finally:
        replica.stop()


def test_a_file_corrupted_on_disk_is_refused_by_checksum(registry_server, modules):
    with _admin(registry_server) as c:
        c.register_adapter(modules["lora-v1"], name="fragile")
        c.register_adapter(modules["prefix-v1"], name="sturdy")
        stored = registry_server.server.store.get("fragile").path / "adapter_model.safetensors"
        stored.write_bytes(stored.read_bytes()[:-8] + b"tampered")
        corrupt = 'plugboard_adapter_loads_total{outcome="corrupt",tier="disk"}'
        error = 'plugboard_adapter_loads_total{outcome="error",tier="disk"}'
        before = _scrape(registry_server.metrics_url)
        for attempt in (1, 2):  # refused at each read: never cached, counted each time
            with pytest.raises(FailedPrecondition, match=r"checksum mismatch: adapter_model\.safetensors"):
                c.generate(PROMPT, adapter="fragile", max_new_tokens=2)
            assert _text(c, "sturdy")[1] == "sturdy@1"
            after = _scrape(registry_server.metrics_url)
            # its own outcome, for an alert: not lumped in with modules that are merely incompatible
            assert after[corrupt] - before.get(corrupt, 0) == attempt
            assert after.get(error, 0) == before.get(error, 0)


def test_concurrent_uploads_of_one_name_get_distinct_versions(registry_server, modules):
    versions: list[int] = []

    def upload() -> None:
        with _admin(registry_server) as c:
            versions.append(c.register_adapter(modules["lora-v1"], name="racy").version)

    threads = [threading.Thread(target=upload) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions) == [1, 2, 3, 4]


def test_a_version_published_for_another_base_model_is_refused(registry_server, modules):
    from plugboard_server.registry.store import ModuleFacts

    store = registry_server.server.store
    with store.staging() as staging:
        shutil.copytree(modules["lora-v1"], staging, dirs_exist_ok=True)
        store.publish(
            "foreign", staging, ModuleFacts("LORA", "LORA", "another-model:0123456789abcdef", rank=4)
        )
    with Client(registry_server.target, timeout=30) as c:
        with pytest.raises(FailedPrecondition, match="another-model"):
            c.generate(PROMPT, adapter="foreign", max_new_tokens=2)
        assert c.generate(PROMPT, max_new_tokens=2).generated_tokens == 2
