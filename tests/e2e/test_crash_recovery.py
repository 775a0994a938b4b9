"""kill -9 during publishing and serving, then restart: the registry is consistent, nothing is lost.

(a) A publisher process (LocalStore, copying directories in and staging uploads, moving aliases,
deleting old versions) is SIGKILLed in each phase of a publish, held there by a hook so that the
kill lands exactly there, and at timed moments besides. (b) A real server is SIGKILLed mid-upload,
mid-publish and mid-generation, then restarted on the same registry.

After each kill the registry is opened again and checked: every listed version verifies against
its checksums, every version the publisher saw published is there, aliases point at versions that
exist, the dead process's staging directory is gone, and nothing half-published is visible.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from plugboard.v1 import adapters_pb2 as apb
from plugboard.v1 import adapters_pb2_grpc
from plugboard_client import Client, PlugboardError
from plugboard_client.adapters import upload_requests
from plugboard_server.errors import AdapterNotFound
from plugboard_server.registry.local import LocalStore, verify_files
from tests.support import peft_modules as pm
from tests.support.tools import free_port

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
NAME = "crashy"

# Publishes argv[4] in a loop and reports each step once it has returned: even rounds copy a
# directory in (publish(source), moving `canary`), odd rounds assemble an upload in staging first;
# then `stable` moves to the new version and the version three back is deleted. With argv[3] =
# "PHASE:N" it stops the N-th time it reaches PHASE, saying "paused PHASE", and waits to be killed.
PUBLISHER = r"""
import os, shutil, sys, time
from pathlib import Path
from plugboard_server.registry import _files, _sqlite, local
from plugboard_server.registry.store import ModuleFacts

root, source, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[4]
phase, _, nth = sys.argv[3].partition(":")
seen = {}


def reached(where):
    seen[where] = seen.get(where, 0) + 1
    if where == phase and seen[where] == int(nth):
        print("paused", where, flush=True)
        time.sleep(3600)


def hook(module, attr, before=None, after=None):
    real = getattr(module, attr)

    def hooked(*args, **kwargs):
        if before and before(*args, **kwargs):
            reached(before(*args, **kwargs))
        result = real(*args, **kwargs)
        if after and after(*args, **kwargs):
            reached(after(*args, **kwargs))
        return result

    setattr(module, attr, hooked)


state = {"in": ""}
# the second block of a file being copied or staged: the file is half there
hook(_files, "write_at", after=lambda fd, data, offset: offset > 0 and state["in"])
hook(local, "digest", before=lambda path, sync=False: sync and "fsync")  # hashing + fsync of each file
hook(local, "fsync_dir", after=lambda path: path.name == name and "renamed")  # renamed, no row yet
hook(_sqlite, "insert_version", after=lambda db, mv: "committing")  # row written, not committed
hook(_sqlite, "set_alias", after=lambda db, name, alias, version: alias == "stable" and "alias")
hook(shutil, "rmtree", before=lambda path, **kw: "/modules/" in str(path) and "deleting")  # row gone

store = local.LocalStore(root)
facts = ModuleFacts("LORA", "LORA", "fingerprint", rank=4)
print("ready", flush=True)
for i in range(10**6):
    if i % 2 == 0:
        state["in"] = "copying"
        mv = store.publish(name, source, facts, alias="canary")
    else:
        with store.staging() as staged:
            state["in"] = "staging"
            for f in sorted(source.iterdir()):
                data, fd = f.read_bytes(), os.open(staged / f.name, os.O_WRONLY | os.O_CREAT)
                for offset in range(0, len(data), 1 << 20):
                    _files.write_at(fd, data[offset:offset + (1 << 20)], offset)
                os.close(fd)
            state["in"] = ""
            mv = store.publish(name, staged, facts)
    state["in"] = ""
    reached("published")  # committed, not yet reported
    print("published", mv.version, flush=True)
    store.set_alias(name, "stable", mv.version)
    print("stable", mv.version, flush=True)
    if mv.version > 3:
        store.delete(name, mv.version - 3)
        print("deleted", mv.version - 3, flush=True)
"""

# Where each kill lands: PHASE:N, the N-th time the publisher gets there, past its first publishes
# (a copy reaches "copying" twice, a staged upload "staging" twice; each publish fsyncs two files).
PAUSES = [
    "copying:3",  # half-way through copying a file into staging
    "staging:3",  # half-way through writing an upload into staging
    "fsync:5",  # hashing and fsyncing the staged files
    "renamed:3",  # the staged dir renamed to modules/NAME/V, its row not inserted
    "committing:3",  # the row inserted, the transaction not committed
    "published:3",  # committed, not reported yet
    "alias:3",  # moving `stable`, not committed
    "deleting:1",  # a delete committed, the version's files not removed yet
]


@dataclass
class Reported:
    """What the publishers said had returned; a kill may come after a step but before its report."""

    published: set[int] = field(default_factory=set)
    deleted: set[int] = field(default_factory=set)
    maybe_deleted: set[int] = field(default_factory=set)  # the delete after the last "stable" line
    stable: int = 0

    def read(self, out: str) -> None:
        for line in out.splitlines():
            what, _, number = line.partition(" ")
            if what == "published":
                self.published.add(int(number))
            elif what == "deleted":
                self.deleted.add(int(number))
                self.maybe_deleted.discard(int(number))
            elif what == "stable":
                self.stable = int(number)
                if self.stable > 3:
                    self.maybe_deleted.add(self.stable - 3)


def _run_publisher(root: Path, source: Path, mode: str, delay: float) -> str:
    """Start a publisher, SIGKILL it (once paused, or after `delay` s), -> what it printed."""
    child = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, str(root), str(source), mode, NAME],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    lines = [child.stdout.readline()]
    assert lines[0] == "ready\n"
    if mode != "run:0":
        while not lines[-1].startswith("paused"):
            lines.append(child.stdout.readline())
            assert lines[-1], f"the publisher ended before pausing at {mode}: {lines}"
    else:
        time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    return "".join(lines) + out


def _check_registry(root: Path, reported: Reported) -> tuple[int, int]:
    """Open the registry as a restarted server would and check it; -> (versions, uncommitted dirs)."""
    store = LocalStore(root)  # removes the dead publisher's staging dirs
    try:
        assert list((root / "staging").iterdir()) == []
        listed = {mv.version: mv for mv in store.versions(NAME)} if store.count()[1] else {}
        for mv in listed.values():
            verify_files(mv.ref)  # complete and intact
            assert sorted(p.name for p in mv.path.iterdir()) == sorted(mv.files)
        assert reported.published - reported.deleted - reported.maybe_deleted <= listed.keys()
        assert not reported.deleted & listed.keys()
        db = sqlite3.connect(root / "index.sqlite")
        try:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            aliases = dict(db.execute("SELECT alias, version FROM aliases WHERE name = ?", (NAME,)))
        finally:
            db.close()
        assert set(aliases.values()) <= listed.keys()  # aliases point at versions that exist
        for alias, version in aliases.items():
            assert store.resolve(f"{NAME}@{alias}").version == version
        if reported.stable:
            assert aliases["stable"] >= reported.stable
        # a version directory without a row (a publish killed before its commit, a delete killed
        # before its files went) is invisible: not listed, not resolvable
        versions_dir = root / "modules" / NAME
        on_disk = {int(p.name) for p in versions_dir.iterdir()} if versions_dir.exists() else set()
        assert listed.keys() <= on_disk
        for orphan in on_disk - listed.keys():
            with pytest.raises(AdapterNotFound):
                store.resolve(f"{NAME}@{orphan}")
        return len(listed), len(on_disk - listed.keys())
    finally:
        store.close()


def test_a_publisher_killed_in_every_phase_leaves_a_consistent_registry(tmp_path: Path):
    root = tmp_path / "registry"
    source = tmp_path / "source"
    source.mkdir()
    (source / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (source / "adapter_model.safetensors").write_bytes(os.urandom(3 << 20))  # 3 blocks of 1 MiB
    rng = random.Random(20240611)
    runs = [*PAUSES, *["run:0"] * 6]
    reported = Reported()
    log = []
    start = time.monotonic()
    for i, mode in enumerate(runs):
        delay = 0.01 + (i - len(PAUSES)) * 0.03 + rng.random() * 0.03  # timed kills: 0.01 s to 0.2 s
        out = _run_publisher(root, source, mode, delay)
        reported.read(out)
        if mode != "run:0":
            assert f"paused {mode.partition(':')[0]}" in out
        last = out.strip().rpartition("\n")[2]
        log.append((mode if mode != "run:0" else f"{delay:.2f}s", last, *_check_registry(root, reported)))
    print(f"\n{time.monotonic() - start:.1f}s; (kill, last report, versions, dirs without a row):")
    print("\n".join(map(str, log)))
    assert reported.published and reported.deleted  # the runs did publish, move and delete
    assert any(uncommitted for *_, uncommitted in log)  # some kills left a version dir behind
    # start-up cleanup removes those (once old enough: 10 minutes by default)
    store = LocalStore(root, orphan_min_age_s=0)
    try:
        listed = {mv.version for mv in store.versions(NAME)}
        assert {int(p.name) for p in (root / "modules" / NAME).iterdir()} == listed
        # and the registry takes new versions, numbered after every one ever committed
        assert store.publish(NAME, source, store.get(NAME).facts).version > max(reported.published)
    finally:
        store.close()


# -- the whole server -------------------------------------------------------------------------------

PROMPT = "The quick brown fox"


class ServerProcess:
    """plugboard-server on `registry`, ready to serve; its output goes to `log`."""

    def __init__(self, model: Path, registry: Path, log: Path) -> None:
        self.target = f"127.0.0.1:{free_port()}"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    str(BIN / "plugboard-server"),
                    "--model",
                    str(model),
                    "--port",
                    self.target.rpartition(":")[2],
                    "--registry",
                    str(registry),
                ],
                env={**os.environ, "HF_HUB_OFFLINE": "1", "PLUGBOARD_METRICS_PORT": "-1"},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            with Client(self.target, timeout=60) as c:
                c.wait_ready(120)
        except BaseException:
            self.stop()
            raise AssertionError(f"the server did not start:\n{log.read_text()[-3000:]}") from None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(30) == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def _greedy(c: Client, adapter: str) -> tuple[str, str]:
    r = c.generate(PROMPT, adapter=adapter, max_new_tokens=12, ignore_eos=True)
    return r.text, r.adapter


@pytest.fixture
def server_modules(tiny_model_dir, tmp_path) -> dict[str, Path]:
    return {
        "lora-a": pm.lora(tiny_model_dir, tmp_path / "lora-a", r=4, seed=31),
        "lora-b": pm.lora(tiny_model_dir, tmp_path / "lora-b", r=4, seed=32),
        "prefix": pm.prefix(tiny_model_dir, tmp_path / "prefix", tokens=4, seed=33),
    }


def test_a_server_killed_mid_upload_and_mid_generation_restarts_with_every_published_version(
    tiny_model_dir, tmp_path, server_modules
):
    registry = tmp_path / "registry"
    server = ServerProcess(tiny_model_dir, registry, tmp_path / "server.log")
    expected: dict[str, tuple[str, str]] = {}  # ref -> greedy output, for every acknowledged version
    same_as: dict[str, str] = {}  # an acknowledged churn version -> the ref with the same files
    held = threading.Event()  # the slow upload is half sent
    release = threading.Event()
    streamed = threading.Event()
    churned = threading.Event()
    errors: list[BaseException] = []
    cut: list[str] = []
    try:
        with Client(server.target, timeout=60) as c:
            for ref, module, name in [
                ("mod@1", "lora-a", "mod"),
                ("mod@2", "lora-b", "mod"),
                ("prefix@1", "prefix", "prefix"),
            ]:
                assert c.register_adapter(server_modules[module], name=name).ref == ref
                expected[ref] = _greedy(c, ref)
            c.set_alias("mod", "stable", 1)
            assert expected["mod@1"][0] != expected["mod@2"][0] != expected["prefix@1"][0]

        def slow_upload() -> None:
            """Sends the header and one chunk, then holds the upload open until the kill."""

            def requests() -> Iterator[apb.RegisterAdapterRequest]:
                for i, message in enumerate(upload_requests(server_modules["lora-b"], name="partial")):
                    if i == 2:
                        held.set()
                        release.wait(60)
                    yield message

            with grpc.insecure_channel(server.target) as channel:
                stub = adapters_pb2_grpc.AdaptersStub(channel)
                with pytest.raises(grpc.RpcError):
                    stub.RegisterAdapter(requests(), timeout=60)

        def churn() -> None:
            """Publishes new versions of `mod` until the server dies; records what was acknowledged."""
            with Client(server.target, timeout=60) as c:
                for _ in range(1000):
                    try:
                        info = c.register_adapter(server_modules["lora-a"], name="mod", alias="canary")
                    except PlugboardError:
                        return
                    same_as[info.ref] = "mod@1"
                    if len(same_as) >= 3:  # then killed during one of the next
                        churned.set()

        def generate() -> None:
            with Client(server.target, timeout=60) as c:
                stream = c.generate_stream(PROMPT, adapter="mod@stable", max_new_tokens=400, ignore_eos=True)
                tokens = len(next(stream).token_ids)
                streamed.set()
                try:
                    for piece in stream:
                        tokens += len(piece.token_ids)
                except PlugboardError as e:  # cut by the kill (unless all 400 came before it)
                    cut.append(f"{tokens} tokens, then {e.code.name}")

        def guarded(fn):
            def run() -> None:
                try:
                    fn()
                except BaseException as e:  # reported by the main thread
                    errors.append(e)
                    for event in (held, streamed, churned):
                        event.set()

            return threading.Thread(target=run, daemon=True)

        threads = [guarded(fn) for fn in (slow_upload, churn, generate)]
        for t in threads:
            t.start()
        for event in (held, streamed, churned):
            assert event.wait(60)
        assert not errors, errors
        deadline = time.monotonic() + 60
        while not any((d / "adapter_config.json").exists() for d in (registry / "staging").iterdir()):
            assert time.monotonic() < deadline, "the held upload never reached staging"
            time.sleep(0.01)
        staging = list((registry / "staging").iterdir())
        server.kill()  # mid-upload (held), mid-generation (streaming), likely mid-publish (churning)
        release.set()
        for t in threads:
            t.join(60)
        assert not errors, errors
    finally:
        release.set()
        server.stop()

    server = ServerProcess(tiny_model_dir, registry, tmp_path / "server.log")
    try:
        assert all(not p.exists() for p in staging)  # the dead server's upload was removed at start
        with Client(server.target, timeout=60) as c:
            for ref, output in expected.items():  # every acknowledged version, unchanged
                assert _greedy(c, ref) == output
            for ref, like in same_as.items():
                assert _greedy(c, ref) == (expected[like][0], ref)
            assert _greedy(c, "mod@stable") == expected["mod@1"]
            listed = c.list_adapters(all_versions=True).adapters
            refs = {a.ref for a in listed}
            assert set(expected) | set(same_as) <= refs
            assert all(not r.startswith("partial@") for r in refs)  # the held upload never appeared
            canary = c.get_adapter("mod@canary")  # the alias moved with the last committed publish
            assert canary.ref in refs
        store = LocalStore(registry)  # every listed version is complete: files there, checksums match
        try:
            assert {r.key for r in store.list()} == refs
            for ref in store.list():
                verify_files(ref)
        finally:
            store.close()
        print(f"\n{len(same_as)} uploads acknowledged before the kill; stream: {cut}; listed: {sorted(refs)}")
    finally:
        server.stop()
