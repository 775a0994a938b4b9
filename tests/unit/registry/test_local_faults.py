"""LocalStore on a failing disk: full (ENOSPC, EDQUOT, a full index) or erring, nothing is half-stored."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from plugboard_server.errors import AdapterNotFound, InvalidRequest, StorageError, StorageFull
from plugboard_server.registry.local import LocalStore, verify_files
from tests.support.faults import DiskFills
from tests.unit.registry.conftest import LORA, MakeModule, write_module


def _nothing_left(store: LocalStore, versions: int) -> None:
    assert store.count()[1] == versions
    assert list((store.root / "staging").iterdir()) == []
    on_disk = sorted(str(p.relative_to(store.root / "modules")) for p in (store.root / "modules").glob("*/*"))
    assert on_disk == sorted(str(Path(r.name) / str(r.version)) for r in store.list())


@pytest.mark.parametrize(
    ("budget", "err"),
    [(0, errno.ENOSPC), (3000, errno.ENOSPC), (20_000, errno.ENOSPC), (5000, errno.EDQUOT)],
    ids=["at-once", "mid-file", "second-file", "quota"],
)
def test_a_disk_filling_up_while_a_module_is_copied_in_stores_nothing(
    store: LocalStore, make_module: MakeModule, monkeypatch, budget: int, err: int
):
    store.publish("ner", make_module(), LORA)
    source = make_module(size=16_384)
    (source / "extra.safetensors").write_bytes(os.urandom(16_384))  # 32 KiB in all: every budget fails
    full = DiskFills(store.root, budget, err)
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(StorageFull) as raised:
        store.publish("ner", source, LORA, alias="prod")
    assert full.refused == 1 and full.written == budget
    message = str(raised.value)
    assert "the registry's disk is full" in message and str(store.root) in message
    assert os.strerror(err) in message
    _nothing_left(store, 1)
    with pytest.raises(AdapterNotFound, match="'prod'"):
        store.resolve("ner@prod")  # the alias went with the failed publish
    monkeypatch.undo()  # space freed: the same publish succeeds, numbered as if nothing happened
    mv = store.publish("ner", source, LORA, alias="prod")
    assert (mv.version, store.resolve("ner@prod").version) == (2, 2)
    verify_files(mv.ref)
    _nothing_left(store, 2)


def test_a_full_disk_at_fsync_stores_nothing(store: LocalStore, make_module: MakeModule, monkeypatch):
    real = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(store.root.resolve())):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a disk that fills late (NFS)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with store.staging() as staged:
        write_module(staged)
        with pytest.raises(StorageFull, match="disk is full"):
            store.publish("ner", staged, LORA)
    _nothing_left(store, 0)
    monkeypatch.undo()
    assert store.publish("ner", make_module(), LORA).version == 1


def test_a_full_index_stores_nothing(store: LocalStore, make_module: MakeModule):
    store.publish("ner", make_module(), LORA)
    db = store._index.connection()  # this thread's connection, which the next publish uses
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    db.execute(f"PRAGMA max_page_count = {pages}")  # a real SQLITE_FULL on the next page needed
    try:
        with pytest.raises(StorageFull, match=r"disk is full \(database or disk is full\)"):
            store.publish("ner", make_module(), LORA, description="x" * 100_000)
        _nothing_left(store, 1)
        with store.staging() as staged:  # the rename was undone: the files went back to staging first
            write_module(staged)
            with pytest.raises(StorageFull):
                store.publish("ner", staged, LORA, description="x" * 100_000)
            assert staged.is_dir()
        _nothing_left(store, 1)
    finally:
        db.execute("PRAGMA max_page_count = 1073741823")
    assert store.publish("ner", make_module(), LORA, description="x" * 100_000).version == 2


def test_other_write_errors_end_as_a_storage_error(store: LocalStore, make_module: MakeModule, monkeypatch):
    monkeypatch.setattr(os, "pwrite", DiskFills(store.root, 100, errno.EIO))
    with pytest.raises(
        StorageError, match=r"writing to the registry failed \(Input/output error\)"
    ) as raised:
        store.publish("ner", make_module(), LORA)
    assert not isinstance(raised.value, StorageFull)
    _nothing_left(store, 0)
    monkeypatch.undo()
    assert store.publish("ner", make_module(), LORA).version == 1


def test_a_file_swapped_for_a_link_is_still_refused(store: LocalStore, make_module: MakeModule, monkeypatch):
    from plugboard_server.registry import local

    source = make_module()
    real_check = local.check_source

    def check_then_swap(path: Path) -> None:
        real_check(path)
        if path == source:  # after the check, before the copy
            (source / "adapter_model.safetensors").unlink()
            (source / "adapter_model.safetensors").symlink_to("/etc/passwd")

    monkeypatch.setattr(local, "check_source", check_then_swap)
    with pytest.raises(InvalidRequest, match=r"'adapter_model\.safetensors'.*no directories or links"):
        store.publish("ner", source, LORA)  # the copy does not follow it
    _nothing_left(store, 0)
