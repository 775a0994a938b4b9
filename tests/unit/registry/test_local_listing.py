"""LocalStore listing: keyset pages, filters, and speed over 10,000 modules."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest

from plugboard_server.errors import InvalidRequest
from plugboard_server.registry import _sqlite
from plugboard_server.registry.local import LocalStore
from plugboard_server.registry.store import ModuleFacts, ModuleVersion
from tests.unit.registry.conftest import LORA, PREFIX, MakeModule


def _walk(store: LocalStore, **filters) -> tuple[list[str], int]:
    keys, token, pages = [], "", 0
    while True:
        page, token = store.list_versions(page_token=token, **filters)
        keys += [mv.key for mv in page]
        pages += 1
        if not token:
            return keys, pages


def test_list_versions_pages_and_filters(store: LocalStore, make_module: MakeModule):
    store.publish("alpha", make_module(), LORA, tags=("nlp",))
    store.publish("alpha", make_module(), PREFIX)
    store.publish("beta", make_module(), LORA, tags=("nlp", "en"))
    store.publish("beta.two", make_module(), PREFIX, tags=("en",))
    store.publish("gamma", make_module(), LORA)
    store.publish("gamma", make_module(), LORA, tags=("nlp",))
    store.set_alias("gamma", "prod", 1)
    page, token = store.list_versions(page_size=2)
    assert [mv.key for mv in page] == ["alpha@2", "beta@1"] and token
    page, token = store.list_versions(page_size=2, page_token=token)
    assert [mv.key for mv in page] == ["beta.two@1", "gamma@2"] and token == ""
    assert page[1].aliases == ("latest",)
    assert _walk(store, page_size=1) == (["alpha@2", "beta@1", "beta.two@1", "gamma@2"], 4)
    everything = ["alpha@1", "alpha@2", "beta@1", "beta.two@1", "gamma@1", "gamma@2"]
    assert _walk(store, page_size=4, all_versions=True) == (everything, 2)
    assert _walk(store, all_versions=True, page_size=1000)[0] == everything
    page, _ = store.list_versions(all_versions=True)
    assert [mv.aliases for mv in page] == [(), ("latest",), ("latest",), ("latest",), ("prod",), ("latest",)]
    # filters apply to each module's latest version, or to every version with all_versions
    assert _walk(store, kind="LORA")[0] == ["beta@1", "gamma@2"]
    assert _walk(store, kind="LORA", all_versions=True)[0] == ["alpha@1", "beta@1", "gamma@1", "gamma@2"]
    assert _walk(store, tag="nlp")[0] == ["beta@1", "gamma@2"]
    assert _walk(store, tag="nlp", all_versions=True)[0] == ["alpha@1", "beta@1", "gamma@2"]
    assert _walk(store, tag="en", kind="PREFIX")[0] == ["beta.two@1"]
    assert _walk(store, name_prefix="beta")[0] == ["beta@1", "beta.two@1"]
    assert _walk(store, name_prefix="beta.", page_size=1) == (["beta.two@1"], 1)
    assert _walk(store, name_prefix="b", tag="nlp")[0] == ["beta@1"]
    assert _walk(store, name_prefix="zeta")[0] == []
    assert _walk(store, tag="none")[0] == []
    page, _ = store.list_versions(tag="en")
    assert page[0].tags == ("nlp", "en") and page[0].facts == LORA
    # page_size 0 means the default; a too-large one is capped
    assert len(store.list_versions(page_size=0, all_versions=True)[0]) == 6
    # deletes between pages neither repeat nor skip what remains
    page, token = store.list_versions(page_size=2, all_versions=True)
    store.delete("alpha")
    store.delete("beta", 1)
    assert [mv.key for mv in store.list_versions(page_token=token, all_versions=True)[0]] == [
        "beta.two@1",
        "gamma@1",
        "gamma@2",
    ]


@pytest.mark.parametrize(
    "token", ["garbage!", "eyJ4IjogMX0=", "WyJhIl0=", "WyJhIiwgIjEiXQ==", "bm90IGpzb24="]
)
def test_a_malformed_page_token_is_refused(store: LocalStore, token: str):
    with pytest.raises(InvalidRequest, match="page token"):
        store.list_versions(page_token=token)


def test_listing_ten_thousand_modules_is_fast(store: LocalStore, make_module: MakeModule):
    # A few real publishes, then the other rows through the insert publish itself uses, in one
    # transaction: publishing 10,000 directories takes ~15 s here, and listing reads only the index.
    for i in range(5):
        store.publish(f"real-{i}", make_module(), LORA, tags=("real",))
    kind_of = ["LORA"] * 16 + ["PREFIX"] * 3 + ["PROMPT"]
    bulk = [  # (name, version, kind, tags): 1 to 3 versions a module; the latest may differ in kind
        (f"mod-{i:05d}", v, kind_of[(i + v) % 20], _tags(i))
        for i in range(10_000 - 5)
        for v in range(1, i % 3 + 2)
    ]
    start = time.perf_counter()
    with store._index.write() as db:
        for name, v, kind, tags in bulk:
            facts = ModuleFacts(kind, kind, "base-fingerprint", rank=8)
            files = {"adapter_config.json": "0" * 64}
            row = ModuleVersion(name, v, facts, 100, files, time.time(), Path(), tags=tags)
            _sqlite.insert_version(db, row)
    print(f"\nbulk insert: {time.perf_counter() - start:.2f} s; (modules, versions) = {store.count()}")
    rows = [(f"real-{i}", 1, "LORA", ("real",)) for i in range(5)] + bulk
    assert store.count() == (10_000, len(rows))
    latest = {name: v for name, v, _, _ in rows}  # rows come in version order

    def expected(kind: str = "", tag: str = "", name_prefix: str = "", all_versions: bool = False) -> int:
        return sum(
            1
            for name, v, k, tags in rows
            if (all_versions or latest[name] == v)
            and (not kind or k == kind)
            and (not tag or tag in tags)
            and name.startswith(name_prefix)
        )

    start = time.perf_counter()
    page, token = store.list_versions(page_size=100)
    first = time.perf_counter() - start
    print(f"first page of 100: {first * 1000:.2f} ms")
    assert len(page) == 100 and token and first < 0.5
    for filters in [
        {},
        {"all_versions": True},
        {"kind": "PROMPT"},
        {"kind": "PREFIX", "all_versions": True},
        {"tag": "common"},
        {"tag": "rare"},
        {"tag": "rare", "all_versions": True, "kind": "LORA"},
        {"name_prefix": "mod-099"},
        {"name_prefix": "mod-05", "kind": "LORA", "all_versions": True},
        {"name_prefix": "nothing"},
    ]:
        start = time.perf_counter()
        keys, pages = _walk(store, page_size=100, **filters)
        per_page = (time.perf_counter() - start) / pages
        print(f"{filters}: {len(keys)} versions, {pages} pages, {per_page * 1000:.2f} ms per page")
        assert len(keys) == len(set(keys)) == expected(**filters)
        assert keys == sorted(keys, key=lambda k: (k.split("@")[0], int(k.split("@")[1])))
        assert per_page < 0.5
    assert _walk(store, tag="real")[0] == [f"real-{i}@1" for i in range(5)]
    start = time.perf_counter()
    for _ in range(100):
        store.resolve("mod-09993")
    print(f"resolve among 10,000 modules: {(time.perf_counter() - start) * 10:.3f} ms")


def _tags(i: int) -> tuple[str, ...]:
    return ("common",) if i % 2 else ("rare",) if i % 100 == 0 else ()


@pytest.mark.parametrize(
    "token",
    [
        ["zz", 2**63],  # past SQLite's integers
        ["zz", -1],
        ["\ud800", 1],  # a lone surrogate
        ["Not A Name", 1],
        ["zz", 1.5],
    ],
)
def test_page_tokens_the_store_never_made_are_refused(store: LocalStore, token: list):
    encoded = base64.urlsafe_b64encode(json.dumps(token).encode()).decode()
    with pytest.raises(InvalidRequest, match="page token"):
        store.list_versions(page_token=encoded)
