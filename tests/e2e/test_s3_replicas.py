"""Two plugboard-server processes on one object-store registry (moto's S3 on 127.0.0.1).

They share no filesystem: each downloads versions into a cache of its own. A module published
through one is served by the other, alias moves and deletes reach both, and both answer alike.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from plugboard_client import Client
from plugboard_client.errors import NotFound
from tests.support import peft_modules as pm
from tests.support.s3 import CREDENTIALS
from tests.support.tools import free_port

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
TOKEN = "replica-admin-token"
PROMPT = "The weather today is"


@pytest.fixture
def replicas(tiny_model_dir: Path, tmp_path: Path, s3_endpoint: str, s3_bucket: str) -> Iterator[list[str]]:
    """Two servers on s3://<bucket>/registry -> their targets."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    procs: list[subprocess.Popen[str]] = []
    targets: list[str] = []
    try:
        for i in range(2):
            port = free_port()
            env = {**os.environ, **CREDENTIALS, "HF_HUB_OFFLINE": "1", "PLUGBOARD_METRICS_PORT": "0"}
            args = [
                str(BIN / "plugboard-server"),
                *("--model", str(tiny_model_dir), "--port", str(port)),
                *("--registry", f"s3://{s3_bucket}/registry", "--registry-endpoint-url", s3_endpoint),
                *("--registry-cache-dir", str(tmp_path / f"cache-{i}")),
                *("--registry-refresh-s", "0.2", "--admin-token-file", str(token_file)),
            ]
            log = open(tmp_path / f"server-{i}.log", "w")  # noqa: SIM115 - closed with the process
            procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, text=True))
            targets.append(f"127.0.0.1:{port}")
        for target in targets:
            with Client(target, timeout=30) as c:
                c.wait_ready(90)
        yield targets
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        for i in range(len(procs)):
            sys.stdout.write((tmp_path / f"server-{i}.log").read_text()[-3000:])


def _eventually(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """What `check` returns once it stops raising AssertionError or NotFound."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, NotFound):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _text(c: Client, adapter: str) -> tuple[str, str]:
    r = c.generate(PROMPT, adapter=adapter, max_new_tokens=10, ignore_eos=True)
    return r.text, r.adapter


def test_a_publish_through_one_replica_is_served_by_the_other(
    replicas: list[str], tmp_path: Path, tiny_model_dir
):
    lora = pm.lora(tiny_model_dir, tmp_path / "lora", r=4, seed=21)
    prefix = pm.prefix(tiny_model_dir, tmp_path / "prefix", tokens=4, seed=22)
    a, b = (Client(t, timeout=60, token=TOKEN) for t in replicas)
    with a, b:
        base = _text(b, "")
        info = a.register_adapter(lora, name="sentiment", alias="prod")
        assert (info.name, info.version) == ("sentiment", 1)
        # b never saw the module: it looks it up in the bucket, downloads it and serves it
        served = _text(b, "sentiment@prod")
        assert served[1] == "sentiment@1" and served[0] != base[0]
        assert _text(a, "sentiment") == served  # both replicas answer alike
        # a second version published through b is servable on a at once by its number ...
        b.register_adapter(prefix, name="sentiment")
        on_a = _text(a, "sentiment@2")
        assert on_a[1] == "sentiment@2" and on_a == _text(b, "sentiment@2")
        # ... and becomes a's "latest" within --registry-refresh-s
        _eventually(lambda: _check(_text(a, "sentiment")[1] == "sentiment@2"))
        # an alias moved on one replica moves on the other; a delete reaches the other too
        a.set_alias("sentiment", "prod", 2)
        _eventually(lambda: _check(_text(b, "sentiment@prod")[1] == "sentiment@2"))
        a.delete_adapter("sentiment@1")

        def deleted_on_b() -> None:
            try:
                _text(b, "sentiment@1")
            except NotFound:
                return
            raise AssertionError("b still serves sentiment@1")

        _eventually(deleted_on_b)
        listed = [(v.name, v.version) for v in b.list_adapters(all_versions=True).adapters]
        assert listed == [("sentiment", 2)]


def _check(ok: bool) -> bool:
    assert ok
    return ok
