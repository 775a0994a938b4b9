"""The two-tier module cache: LRU, pinning and in-use protection, asserted on the slot map itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from plugboard_server.adapters.manager import AdapterManager
from plugboard_server.adapters.shape import model_shape
from plugboard_server.adapters.types import AdapterLimits
from plugboard_server.errors import IncompatibleAdapter, Overloaded
from plugboard_server.models.loading import load_model
from plugboard_server.registry.store import AdapterRef
from tests.support import peft_modules as pm


@pytest.fixture(scope="module")
def module_dirs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cache-modules")
    makers = {
        "a": lambda out: pm.lora(tiny_model_dir, out, r=2, seed=1),
        "b": lambda out: pm.prefix(tiny_model_dir, out, tokens=3, seed=2),
        "c": lambda out: pm.prompt_tuning(tiny_model_dir, out, tokens=3, seed=3),
        "d": lambda out: pm.lora(tiny_model_dir, out, r=4, seed=4),
    }
    return {name: make(root / name) for name, make in makers.items()}


@pytest.fixture
def manager(tiny_model_dir) -> AdapterManager:
    loaded = load_model(str(tiny_model_dir))
    return AdapterManager(
        loaded.model,
        model_shape(loaded.model),
        max_slots=2,
        max_host=3,
        limits=AdapterLimits(max_lora_rank=8),
        dtype=torch.float32,
        device=torch.device("cpu"),
    )


def _ref(dirs: dict[str, Path], name: str) -> AdapterRef:
    return AdapterRef(name, 1, dirs[name])


def _reserve(manager: AdapterManager, dirs, name: str):
    ref = _ref(dirs, name)
    return manager.reserve(ref.key, manager.load(ref))


def test_lru_eviction_of_idle_slots(manager, module_dirs):
    a = _reserve(manager, module_dirs, "a")
    b = _reserve(manager, module_dirs, "b")
    assert manager.slot_map() == {"a@1": (a.slot, 1, False), "b@1": (b.slot, 1, False)}
    assert _reserve(manager, module_dirs, "c") is None  # both slots busy: the request waits
    manager.release(a)
    c = _reserve(manager, module_dirs, "c")  # a was idle: its slot goes to c
    assert c.slot == a.slot
    assert manager.slot_map() == {"b@1": (b.slot, 1, False), "c@1": (c.slot, 1, False)}
    assert manager.residency("a@1") == ("HOST", False)
    again = _reserve(manager, module_dirs, "b")  # a hit: the same slot, one more reference
    assert again is b and manager.slot_map()["b@1"] == (b.slot, 2, False)


def test_pinned_modules_are_never_evicted(manager, module_dirs):
    pinned = manager.pin(_ref(module_dirs, "a"))
    assert manager.residency("a@1") == ("DEVICE", True)
    b = _reserve(manager, module_dirs, "b")
    manager.release(b)
    c = _reserve(manager, module_dirs, "c")
    assert c.slot == b.slot  # b was idle and unpinned; a stays
    assert set(manager.slot_map()) == {"a@1", "c@1"}
    with pytest.raises(Overloaded, match="unload one first"):
        manager.pin(_ref(module_dirs, "d"))  # a pinned, c in use
    manager.unload("a@1")
    assert manager.residency("a@1") == ("DISK", False)
    assert pinned.slot not in {s for s, _, _ in manager.slot_map().values()}
    assert manager.pin(_ref(module_dirs, "d")).slot == pinned.slot


def test_unloading_a_module_in_use_keeps_its_slot_until_the_last_row_leaves(manager, module_dirs):
    a = _reserve(manager, module_dirs, "a")
    manager.unload("a@1")
    assert "a@1" not in manager.slot_map()
    b = _reserve(manager, module_dirs, "b")
    assert b.slot != a.slot
    assert _reserve(manager, module_dirs, "c") is None  # a's slot is still held by its running row
    manager.release(a)
    assert _reserve(manager, module_dirs, "c").slot == a.slot


def test_a_module_is_unservable_only_while_every_slot_stays_pinned_by_others(manager, module_dirs):
    manager.pin(_ref(module_dirs, "a"))
    b = manager.pin(_ref(module_dirs, "b"))
    manager.check_servable("a@1")  # has a slot
    with pytest.raises(Overloaded, match="pinned"):
        manager.check_servable("c@1")
    in_use = manager.reserve("b@1", manager.load(_ref(module_dirs, "b")))
    manager.unload("b@1")  # b's slot frees when its row leaves: c may wait for it
    manager.check_servable("c@1")
    manager.release(in_use)
    assert in_use is b
    manager.check_servable("c@1")
    assert _reserve(manager, module_dirs, "c").slot == b.slot


def test_host_tier_is_bounded_lru(manager, module_dirs):
    for name in ("a", "b", "c", "d"):
        manager.load(_ref(module_dirs, name))
    assert manager.host_keys() == ["b@1", "c@1", "d@1"]  # max_host=3: a went first
    manager.load(_ref(module_dirs, "b"))  # a hit moves it to the back
    assert manager.host_keys() == ["c@1", "d@1", "b@1"]


def test_checksums_are_verified_when_reading_from_disk(manager, module_dirs, tmp_path):
    import shutil

    from plugboard_server.registry.local import verify_files  # noqa: F401 - the function the manager calls

    copy = tmp_path / "a-copy"
    shutil.copytree(module_dirs["a"], copy)
    good = AdapterRef("x", 1, copy, (("adapter_config.json", "0" * 64),))
    with pytest.raises(IncompatibleAdapter, match=r"adapter_config\.json"):
        manager.load(good)
    assert manager.residency("x@1") == ("DISK", False)


def _loads(manager: AdapterManager, outcome: str) -> float:
    sample = {"tier": "disk", "outcome": outcome}
    return manager.metrics.registry.get_sample_value("plugboard_adapter_loads_total", sample) or 0.0


def test_a_version_deleted_before_its_files_are_read_is_not_found(
    manager, module_dirs, tmp_path, monkeypatch
):
    from plugboard_server.errors import AdapterNotFound, CorruptModule
    from plugboard_server.registry.local import LocalStore
    from plugboard_server.registry.store import ModuleFacts

    store = LocalStore(tmp_path / "registry")
    facts = ModuleFacts("LORA", "LORA", "fp", rank=2)
    for _ in range(3):
        store.publish("m", module_dirs["a"], facts)
    # resolved, then deleted (row and files) before the first read: NOT_FOUND, counted as "deleted"
    ref = store.resolve("m@1")
    store.delete("m", 1)
    with pytest.raises(AdapterNotFound, match=r"module m@1 was deleted"):
        manager.load(ref)
    assert _loads(manager, "deleted") == 1
    # deleted between the checksums and the read of the tensors: the same
    ref = store.resolve("m@2")

    def fetch_then_delete(r: AdapterRef) -> Path:
        path = store.fetch(r)  # checksums checked
        store.delete("m", 2)
        return path

    monkeypatch.setattr(manager, "_fetch", fetch_then_delete)
    with pytest.raises(AdapterNotFound, match=r"module m@2 was deleted"):
        manager.load(ref)
    monkeypatch.undo()
    assert _loads(manager, "deleted") == 2
    # a file missing from a version still in the index is corruption, counted as such
    ref = store.resolve("m@3")
    (ref.path / "adapter_model.safetensors").unlink()
    with pytest.raises(CorruptModule, match=r"module m@3: checksum mismatch: adapter_model.safetensors"):
        manager.load(ref)
    assert (_loads(manager, "corrupt"), _loads(manager, "error"), _loads(manager, "ok")) == (1, 0, 0)
    assert manager.host_keys() == []
    store.close()
