"""The two registry stores answer alike: one script of publishes, aliases and deletes, run on both."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from plugboard_server.errors import PlugboardError
from plugboard_server.registry.local import LocalStore
from plugboard_server.registry.s3 import S3Store
from plugboard_server.registry.store import RegistryStore
from tests.support import s3
from tests.unit.registry.conftest import LORA, PREFIX, MakeModule

NAMES = ("alpha", "alpha.b", "beta", "gamma")
FILTERS: list[dict[str, Any]] = [
    {},
    {"all_versions": True},
    {"kind": "PREFIX"},
    {"kind": "LORA", "all_versions": True},
    {"tag": "nlp"},
    {"tag": "nlp", "all_versions": True},
    {"name_prefix": "alpha"},
    {"name_prefix": "alpha", "all_versions": True, "page_size": 2},
    {"page_size": 1},
]


def _apply(store: RegistryStore, op: tuple[Any, ...], source: Path) -> Any:
    """One operation -> what the store answered (comparable across stores), or the error's class."""
    kind, name, *args = op
    try:
        if kind == "publish":
            facts, tags, alias = args
            return store.publish(name, source, facts, tags=tags, alias=alias).key
        if kind == "alias":
            return store.set_alias(name, "prod", args[0]).key
        if kind == "delete":
            return store.delete(name, args[0], force=args[1])
        if kind == "get":
            mv = store.get(f"{name}{args[0]}")
            return (mv.key, mv.facts, mv.tags, mv.aliases, dict(mv.files))
    except PlugboardError as e:
        return type(e).__name__
    raise AssertionError(op)


def _script(seed: int) -> list[tuple[Any, ...]]:
    rng = random.Random(seed)
    ops: list[tuple[Any, ...]] = []
    for _ in range(60):
        name = rng.choice(NAMES)
        roll = rng.random()
        if roll < 0.45:
            tags = tuple(rng.sample(["nlp", "en", "fr"], rng.randint(0, 2)))
            ops.append(("publish", name, rng.choice([LORA, PREFIX]), tags, rng.choice([None, "prod"])))
        elif roll < 0.6:
            ops.append(("alias", name, rng.randint(1, 6)))
        elif roll < 0.75:
            ops.append(("delete", name, rng.choice([None, *range(1, 7)]), rng.random() < 0.5))
        else:
            ops.append(("get", name, rng.choice(["", "@1", "@2", "@prod", "@latest", "@9"])))
    return ops


def _pages(store: RegistryStore, filters: dict[str, Any]) -> list[list[str]]:
    pages, token = [], ""
    while True:
        page, token = store.list_versions(page_token=token, **filters)
        pages.append([v.key for v in page])
        if not token:
            return pages


@pytest.mark.parametrize("seed", [1, 2])
def test_local_and_object_store_answer_every_call_alike(
    seed: int, s3_endpoint: str, s3_bucket: str, tmp_path: Path, make_module: MakeModule
):
    local = LocalStore(tmp_path / "local")
    remote = S3Store(
        s3_bucket, "r", client=s3.client(s3_endpoint), cache_dir=tmp_path / "cache", clean_at_start=False
    )
    try:
        for op in _script(seed):
            source = make_module()
            answers = [_apply(store, op, source) for store in (local, remote)]
            assert answers[0] == answers[1], op
        assert local.count() == remote.count()
        assert [r.key for r in local.list()] == [r.key for r in remote.list()]
        for filters in FILTERS:
            assert _pages(local, filters) == _pages(remote, filters), filters
    finally:
        local.close()
