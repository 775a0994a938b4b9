"""LocalStore across processes: publishers killed mid-publish, and replicas publishing concurrently."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from plugboard_server.registry.local import LocalStore, verify_files
from tests.unit.registry.conftest import LORA, write_module

# Publishes forever, alternating a copied source and a staged one, so that a kill lands anywhere:
# copying, hashing, fsyncing, waiting for the write lock, between rename and commit, after commit.
PUBLISHER = r"""
import os, signal, sys, time
from pathlib import Path
from plugboard_server.registry import local
from plugboard_server.registry.local import LocalStore
from plugboard_server.registry.store import ModuleFacts

root, source = Path(sys.argv[1]), Path(sys.argv[2])
die_after_rename = sys.argv[3] == "die-after-rename"
fsync_dir = local.fsync_dir


def slow_fsync_dir(path):
    # Slow fsyncs of directories, one of them (of modules/big) between the rename and the commit,
    # so that random kills land there too; or a certain death there.
    if die_after_rename and path.name == "big":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.01)
    fsync_dir(path)


local.fsync_dir = slow_fsync_dir
store = LocalStore(root)
facts = ModuleFacts("LORA", "LORA", "base-fingerprint", rank=8)
print("ready", flush=True)
while True:
    print(store.publish("big", source, facts).version, flush=True)
    with store.staging() as staged:
        for f in source.iterdir():
            (staged / f.name).write_bytes(f.read_bytes())
        print(store.publish("big", staged, facts).version, flush=True)
"""

# Waits for the go file, so both replicas publish at once, then publishes `count` versions.
RACER = r"""
import sys, time
from pathlib import Path
from plugboard_server.registry.local import LocalStore
from plugboard_server.registry.store import ModuleFacts

root, source, go, count = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
store = LocalStore(root)
while not go.exists():
    time.sleep(0.001)
for _ in range(count):
    print(store.publish("shared", source, ModuleFacts("LORA", "LORA", "fp")).version, flush=True)
"""


def _spawn(script: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE, text=True
    )


def test_a_publisher_killed_at_any_point_leaves_a_consistent_registry(tmp_path: Path):
    root = tmp_path / "registry"
    source = write_module(tmp_path / "source", size=8 << 20)
    rng = random.Random(1234)
    reported: set[int] = set()
    leftovers: list[tuple[int, int]] = []
    for trial in range(10):
        certain = trial in (0, 6)  # the first version, and one with versions before it
        child = _spawn(PUBLISHER, root, source, "die-after-rename" if certain else "random")
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        if not certain:
            time.sleep(0.02 + trial * 0.04 + rng.random() * 0.05)
            child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=60)
        assert child.returncode == -signal.SIGKILL
        reported.update(int(line) for line in out.split())
        leftovers.append(_leftovers(root))
    store = LocalStore(root, orphan_min_age_s=0)  # the default waits 10 minutes before removing
    versions = store.versions("big") if store.count()[1] else []
    print(f"\n{len(versions)} versions committed, {len(reported)} reported by the killed publishers")
    print(f"left by each kill (staging dirs, uncommitted version dirs): {leftovers}")
    # what the next publisher (when it reaches that number) or start-up cleanup removes
    assert leftovers[0][1] == leftovers[6][1] == 1
    # every publish a child saw return is there; a version may also be committed but not yet reported
    assert reported <= {mv.version for mv in versions}
    for mv in versions:
        verify_files(mv.ref)
        assert sorted(p.name for p in mv.path.iterdir()) == sorted(mv.files)
    # nothing else is left: no staging dirs, no version directories without a row
    assert list((root / "staging").iterdir()) == []
    on_disk = {int(p.name) for p in (root / "modules" / "big").iterdir()} if versions else set()
    assert on_disk == {mv.version for mv in versions}
    db = sqlite3.connect(root / "index.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    # and it takes new versions, numbered after every one ever committed
    after = store.publish("big", source, LORA)
    assert after.version > max((mv.version for mv in versions), default=0)


def _leftovers(root: Path) -> tuple[int, int]:
    db = sqlite3.connect(root / "index.sqlite")
    committed = {v for (v,) in db.execute("SELECT version FROM versions WHERE name = 'big'")}
    db.close()
    versions = root / "modules" / "big"
    on_disk = {int(p.name) for p in versions.iterdir()} if versions.exists() else set()
    return len(list((root / "staging").iterdir())), len(on_disk - committed)


def test_two_replicas_publishing_one_name_get_distinct_versions(tmp_path: Path):
    root = tmp_path / "registry"  # not there yet: both replicas create the index at once too
    source = write_module(tmp_path / "source", size=4096)
    go = tmp_path / "go"
    racers = [_spawn(RACER, root, source, go, 10) for _ in range(2)]
    time.sleep(0.5)
    go.touch()
    outputs = [r.communicate(timeout=60)[0] for r in racers]
    assert [r.returncode for r in racers] == [0, 0]
    got = [[int(v) for v in out.split()] for out in outputs]
    assert sorted(got[0] + got[1]) == list(range(1, 21))
    assert all(g == sorted(g) for g in got)
    store = LocalStore(root)
    assert [mv.version for mv in store.versions("shared")] == list(range(1, 21))
    for mv in store.versions("shared"):
        verify_files(mv.ref)
    assert list((root / "staging").iterdir()) == []
