"""LocalStore refuses every malformed module name, alias target and tag, before touching the disk."""

from __future__ import annotations

import pytest

from plugboard_server.errors import InvalidRequest
from plugboard_server.registry.local import LocalStore
from tests.unit.registry.conftest import LORA, MakeModule

BAD_NAMES = [
    *("", "A", "Sentiment", "a/b", "..", ".", "../x", "x/../../y", "/abs", "-x", "_x", "x" * 65, "a b"),
    *("x\n", "x\r", "\nx", "x\x00"),  # "$" in a pattern would pass "x\n"
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_everywhere(store: LocalStore, make_module: MakeModule, name: str):
    src = make_module()
    before = sorted(p.relative_to(store.root) for p in store.root.rglob("*"))
    with pytest.raises(InvalidRequest):
        store.publish(name, src, LORA)
    with pytest.raises(InvalidRequest):
        store.delete(name)
    with pytest.raises(InvalidRequest):
        store.versions(name)
    with pytest.raises(InvalidRequest):
        store.set_alias(name, "prod", 1)
    with pytest.raises(InvalidRequest):
        store.resolve(name)
    with pytest.raises(InvalidRequest):
        store.publish("ok", src, LORA, tags=(name,))
    after = sorted(p.relative_to(store.root) for p in store.root.rglob("*"))
    assert after == before


def test_64_character_names_are_fine(store: LocalStore, make_module: MakeModule):
    name = "a" * 64
    assert store.publish(name, make_module(), LORA).key == f"{name}@1"
    assert store.publish("a.b_c-9", make_module(), LORA).key == "a.b_c-9@1"
