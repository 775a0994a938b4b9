"""import_directory: new modules published, unchanged skipped, changed ones versioned, bad ones skipped."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from plugboard_server.errors import IncompatibleAdapter
from plugboard_server.registry.importer import import_directory
from plugboard_server.registry.local import LocalStore, verify_files
from plugboard_server.registry.store import ModuleFacts
from tests.unit.registry.conftest import LORA, PREFIX, write_module


def _facts(path: Path) -> ModuleFacts:
    if path.name.startswith("wrong"):
        raise IncompatibleAdapter(f"{path.name}: hidden size 64, the base model's is 576")
    return PREFIX if path.name.startswith("prefix") else LORA


def test_import_publishes_skips_and_versions(store: LocalStore, tmp_path: Path, caplog):
    src = tmp_path / "adapters"
    write_module(src / "sentiment")
    write_module(src / "prefix-qa")
    write_module(src / "Bad Name")
    write_module(src / "wrong-size")
    (src / "no-config").mkdir()
    (write_module(src / "nested") / "sub").mkdir()  # publish refuses directories inside a module
    (src / "stray-file").write_text("x")
    with caplog.at_level(logging.INFO):
        published = import_directory(store, src, _facts)
    assert [mv.key for mv in published] == ["prefix-qa@1", "sentiment@1"]
    assert store.get("prefix-qa").facts == PREFIX
    for mv in published:
        verify_files(mv.ref)
    assert store.count() == (2, 2)
    log = caplog.text
    assert "Bad Name" in log and "wrong-size" in log and "hidden size 64" in log and "nested" in log

    # unchanged: nothing new
    assert import_directory(store, src, _facts) == []
    assert store.count() == (2, 2)

    # a changed file, and a new module: each a new version
    (src / "sentiment" / "adapter_model.safetensors").write_bytes(os.urandom(100))
    write_module(src / "ner")
    published = import_directory(store, src, _facts)
    assert [mv.key for mv in published] == ["ner@1", "sentiment@2"]
    assert store.resolve("sentiment").version == 2
    # an added file counts as a change too
    (src / "prefix-qa" / "README.md").write_text("notes")
    assert [mv.key for mv in import_directory(store, src, _facts)] == ["prefix-qa@2"]
    assert import_directory(store, src, _facts) == []


def test_a_module_that_stops_fitting_is_skipped_and_its_versions_kept(store: LocalStore, tmp_path: Path):
    src = tmp_path / "adapters"
    write_module(src / "wrong-later")
    assert import_directory(store, src, lambda p: LORA)[0].key == "wrong-later@1"
    (src / "wrong-later" / "adapter_model.safetensors").write_bytes(b"changed")
    assert import_directory(store, src, _facts) == []
    assert [mv.version for mv in store.versions("wrong-later")] == [1]


@pytest.mark.parametrize("missing", [True, False])
def test_importing_nothing(store: LocalStore, tmp_path: Path, missing: bool):
    root = tmp_path / "adapters"
    if not missing:
        root.mkdir()
    assert import_directory(store, root, _facts) == []
