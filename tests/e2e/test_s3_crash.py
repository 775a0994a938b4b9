"""kill -9 a process publishing to an object-store registry, at random moments: nothing half-published.

The publisher (a real process on moto's S3 server) publishes new versions in a loop, moves the alias
`stable` to each, and deletes the version three back, reporting each step once it returned. After each
kill a fresh store checks: every acknowledged version that was not deleted is there and its files
match their checksums; every listed version is whole; `stable` points at a real version; and after
clean_orphans nothing is left in the bucket that no version owns.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plugboard_server.registry.s3 import S3Store
from tests.support import s3
from tests.support.s3 import CREDENTIALS

pytestmark = pytest.mark.e2e
NAME = "crashy"

PUBLISHER = r"""
import os, sys
from pathlib import Path
from plugboard_server.registry.open import open_store
from plugboard_server.registry.store import ModuleFacts

url, endpoint, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
store = open_store(url, cache_root=work / "cache", endpoint_url=endpoint)
facts = ModuleFacts("LORA", "LORA", "base", rank=4, target_modules=("q_proj",))
for i in range(1_000_000):
    src = work / f"src-{os.getpid()}-{i}"
    src.mkdir(parents=True)
    (src / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (src / "adapter_model.safetensors").write_bytes(os.urandom(20_000 + 997 * (i % 40)))
    mv = store.publish("crashy", src, facts)
    print("published", mv.version, flush=True)
    store.set_alias("crashy", "stable", mv.version)
    print("aliased", mv.version, flush=True)
    if mv.version > 3:
        store.delete("crashy", mv.version - 3)
        print("deleted", mv.version - 3, flush=True)
"""


def _store(endpoint: str, bucket: str, cache: Path) -> S3Store:
    return S3Store(
        bucket, "reg", client=s3.client(endpoint), cache_dir=cache, clean_at_start=False, orphan_min_age_s=0
    )


def _objects(store: S3Store) -> set[str]:
    listed = store._s3.list_objects_v2(Bucket=store.bucket, Prefix=f"{store.prefix}objects/")
    return {o["Key"] for o in listed.get("Contents", [])}


def test_a_publisher_killed_at_any_moment_leaves_a_whole_registry(
    s3_endpoint: str, s3_bucket: str, tmp_path: Path
):
    rng = random.Random(7)
    script = tmp_path / "publisher.py"
    script.write_text(PUBLISHER)
    env = {**os.environ, **CREDENTIALS}
    acknowledged: set[int] = set()
    deleted: set[int] = set()
    for kill in range(8):
        proc = subprocess.Popen(
            [sys.executable, str(script), f"s3://{s3_bucket}/reg", s3_endpoint, str(tmp_path / "work")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.0 + rng.random() * 1.5)  # past the imports, then somewhere inside the loop
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        steps = [line.split() for line in out.splitlines()]
        assert steps, f"kill {kill}: the publisher did nothing before it was killed\n{err[-2000:]}"
        acknowledged |= {int(v) for what, v in steps if what == "published"}
        deleted |= {int(v) for what, v in steps if what == "deleted"}

        # Killed inside a delete (after "aliased v"), version v - 3 may be gone or not.
        what, last = steps[-1][0], int(steps[-1][1])
        maybe_deleted = {last - 3} if what == "aliased" else set()

        store = _store(s3_endpoint, s3_bucket, tmp_path / f"check-{kill}")
        listed = {v.version for v in store.versions(NAME)}
        missing = acknowledged - deleted - listed
        assert missing <= maybe_deleted, f"kill {kill}: acknowledged versions {missing} are missing"
        deleted |= missing
        for version in listed:  # every listed version is whole and matches its checksums
            store.fetch(store.resolve(f"{NAME}@{version}"))
        assert store.get(f"{NAME}@stable").version in listed
        store.clean_orphans()
        owned = {r["objects"] for r in store._indexes.get(NAME, fresh=True).versions.values()}
        leftovers = {k for k in _objects(store) if not any(k.startswith(o) for o in owned)}
        assert not leftovers, f"kill {kill}: objects no version owns: {sorted(leftovers)[:5]}"
    assert len(acknowledged) >= 8  # the kills did land inside the loop, many times over
