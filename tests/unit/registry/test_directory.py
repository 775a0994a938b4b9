from __future__ import annotations

import pytest

from plugboard_server.errors import AdapterNotFound, InvalidRequest
from plugboard_server.registry.directory import DirectoryStore
from plugboard_server.registry.store import parse_ref


def _module(root, name):
    (root / name).mkdir()
    (root / name / "adapter_config.json").write_text("{}")


def test_each_subdirectory_is_version_1_of_a_module(tmp_path):
    _module(tmp_path, "sentiment")
    _module(tmp_path, "qa.v2")
    (tmp_path / "not-a-module").mkdir()  # no adapter_config.json
    store = DirectoryStore(tmp_path)
    assert sorted(r.key for r in store.list()) == ["qa.v2@1", "sentiment@1"]
    for ref in ("sentiment", "sentiment@1", "sentiment@latest"):
        assert store.resolve(ref).path == tmp_path / "sentiment"


def test_unknown_names_versions_and_aliases(tmp_path):
    _module(tmp_path, "sentiment")
    store = DirectoryStore(tmp_path)
    with pytest.raises(AdapterNotFound, match=r"'nope'.*sentiment"):
        store.resolve("nope")
    with pytest.raises(AdapterNotFound, match="version or alias '2'"):
        store.resolve("sentiment@2")
    with pytest.raises(AdapterNotFound, match="stable"):
        store.resolve("sentiment@stable")


def test_no_directory_means_no_modules(tmp_path):
    assert DirectoryStore(None).list() == []
    assert DirectoryStore(tmp_path / "missing").list() == []
    with pytest.raises(AdapterNotFound, match="no modules are registered"):
        DirectoryStore(None).resolve("x")


@pytest.mark.parametrize("ref", ["", "@1", "a b", "x@", "../etc", "x@y@z", "é"])
def test_malformed_refs(ref):
    with pytest.raises(InvalidRequest):
        parse_ref(ref)
