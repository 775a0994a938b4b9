"""plugboard-server as a real process: serve, answer the CLI, drain on SIGTERM and exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from plugboard.v1 import generation_pb2 as pb
from plugboard_client import Client
from tests.support.tools import free_port

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


@pytest.fixture
def server_process(tiny_model_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PLUGBOARD_METRICS_PORT": "0"}
    proc = subprocess.Popen(
        [
            str(BIN / "plugboard-server"),
            "--model",
            str(tiny_model_dir),
            "--port",
            str(port),
            "--registry",
            str(tmp_path / "registry"),
            "--grace-period",
            "20",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as c:
            c.wait_ready(60)
        yield proc, f"127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_cli_talks_to_the_server(server_process):
    _, target = server_process
    run = subprocess.run(
        [str(BIN / "plugboard"), "--target", target, "generate", "Hello", "--raw", "--max-new-tokens", "4"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    info = subprocess.run(
        [str(BIN / "plugboard"), "--target", target, "info"], capture_output=True, text=True, timeout=60
    )
    assert info.returncode == 0 and "tiny-llama-s0" in info.stdout
    bad = subprocess.run(
        [str(BIN / "plugboard"), "--target", target, "generate", "Hello", "--raw", "--max-new-tokens", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr


def test_sigterm_drains_an_in_flight_stream_then_exits_zero(server_process):
    proc, target = server_process
    with Client(target, timeout=60) as c:
        stream = c.generate_stream("drain me", max_new_tokens=400, ignore_eos=True)
        received = [next(stream)]
        proc.send_signal(signal.SIGTERM)
        received.extend(stream)
    assert received[-1].finish_reason == pb.LENGTH
    assert received[-1].generated_tokens == 400
    assert proc.wait(30) == 0
    log = proc.stdout.read()
    assert "draining" in log and "stopped (drained)" in log


def test_a_model_that_cannot_load_exits_non_zero_with_a_clear_message(tmp_path):
    run = subprocess.run(
        [
            str(BIN / "plugboard-server"),
            "--model",
            str(tmp_path / "no-such-model"),
            "--port",
            str(free_port()),
            "--metrics-port",
            "-1",
            "--registry",
            str(tmp_path / "registry"),
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert "start-up failed" in run.stderr and "no-such-model" in run.stderr
