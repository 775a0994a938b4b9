from __future__ import annotations

from pathlib import Path

import pytest

from plugboard_server.config import ServerConfig


def test_defaults_match_the_readme():
    c = ServerConfig.from_args([])
    assert (c.model, c.host, c.port, c.metrics_port, c.registry) == (
        "default",
        "127.0.0.1",
        50051,
        9400,
        Path("var/registry"),
    )


def test_flags_and_environment(monkeypatch):
    monkeypatch.setenv("PLUGBOARD_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("PLUGBOARD_DTYPE", "bfloat16")
    c = ServerConfig.from_args(["--port", "6000", "--model", "/m"])
    assert (c.port, c.model, c.max_batch_size, c.dtype) == (6000, "/m", 7, "bfloat16")
    assert ServerConfig.from_args(["--max-batch-size", "3"]).max_batch_size == 3  # a flag beats the env
    assert c.engine_config().max_batch_size == 7


@pytest.mark.parametrize("argv", [["--max-batch-size", "0"], ["--port", "70000"], ["--dtype", "int4"]])
def test_bad_values_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        ServerConfig.from_args(argv)
    assert exc.value.code == 2


def test_help_lists_every_flag_with_its_variable(capsys):
    with pytest.raises(SystemExit):
        ServerConfig.from_args(["--help"])
    out = capsys.readouterr().out
    for flag in (
        "--model",
        "--registry",
        "--metrics-port",
        "--quantize",
        "--max-batch-size",
        "PLUGBOARD_PORT",
    ):
        assert flag in out
