"""plugboard-tune as a real process: Ctrl-C mid-training publishes nothing; torchrun trains data-parallel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
WORDS = ["cat", "sun", "tree", "rock", "fish", "cloud", "lamp", "road", "bird", "milk"]


@pytest.fixture
def toy_data(tmp_path: Path) -> Path:
    path = tmp_path / "toy.jsonl"
    rows = [{"text": f"word: {w}", "label": "a" if i % 2 else "b"} for i, w in enumerate(WORDS * 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(model: Path, data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--base", str(model), "--device", "cpu", "--data", str(data), "--text-field", "text",
        "--label-field", "label", "--label-words", "a=yes,b=no", "--method", "lora", "--lr", "1e-2",
        "--batch-size", "4", "--output", str(tmp_path / "out"), "--name", "toy", "-q", *extra,
    ]  # fmt: skip


def test_ctrl_c_while_training_exits_130_and_publishes_nothing(tiny_model_dir, toy_data, tmp_path):
    registry = tmp_path / "registry"
    proc = subprocess.Popen(
        [
            str(BIN / "plugboard-tune"),
            *_args(tiny_model_dir, toy_data, tmp_path, "--max-steps", "100000", "--publish", str(registry)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        # "before: ..." is printed just before the first training step.
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("before:"):
                break
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted; nothing was published" in err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]
    assert not any((registry / "modules").iterdir())


def test_torchrun_trains_on_two_processes_and_the_main_one_saves(tiny_model_dir, toy_data, tmp_path):
    run = subprocess.run(
        [
            str(BIN / "torchrun"),
            "--nproc_per_node",
            "2",
            "-m",
            "plugboard_tuning.cli",
            *_args(tiny_model_dir, toy_data, tmp_path, "--max-steps", "6"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("trained 6 steps") == 1  # the main process reports; both trained
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["training"]["steps"] == 6 and report["data"]["train"] == 16
