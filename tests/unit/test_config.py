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
        "var/registry",
    )


def test_an_object_store_registry_keeps_its_url():
    c = ServerConfig.from_args(["--registry", "s3://models/registry", "--registry-refresh-s", "0.5"])
    assert (c.registry, c.registry_refresh_s) == ("s3://models/registry", 0.5)


def test_flags_and_environment(monkeypatch):
    monkeypatch.setenv("PLUGBOARD_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("PLUGBOARD_DTYPE", "bfloat16")
    c = ServerConfig.from_args(["--port", "6000", "--model", "/m"])
    assert (c.port, c.model, c.max_batch_size, c.dtype) == (6000, "/m", 7, "bfloat16")
    assert ServerConfig.from_args(["--max-batch-size", "3"]).max_batch_size == 3  # a flag beats the env
    assert c.engine_config().max_batch_size == 7


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-batch-size", "0"],
        ["--port", "70000"],
        ["--dtype", "int4"],
        ["--registry", "ftp://host/registry"],
        ["--registry-cache-bytes", "0"],
    ],
)
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


PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


@pytest.fixture
def security_files(tmp_path: Path) -> dict[str, Path]:
    files = {"cert": PEM, "key": PEM.replace("CERTIFICATE", "PRIVATE KEY"), "ca": PEM}
    files |= {
        "admin": "admin-token\n",
        "inference": "inference-token\n",
        "same": "admin-token",
        "der": "\x30\x82",
    }
    files |= {"empty": "  \n", "spaced": "two words\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return {name: tmp_path / name for name in files}


def test_security_flags_and_environment(security_files, monkeypatch):
    f = security_files
    monkeypatch.setenv("PLUGBOARD_INFERENCE_TOKEN_FILE", str(f["inference"]))
    flags = {"--tls-cert": "cert", "--tls-key": "key", "--tls-client-ca": "ca", "--admin-token-file": "admin"}
    c = ServerConfig.from_args([arg for flag, name in flags.items() for arg in (flag, str(f[name]))])
    assert (c.tls_cert, c.tls_key, c.tls_client_ca) == (f["cert"], f["key"], f["ca"])
    assert (c.admin_token_file, c.inference_token_file) == (f["admin"], f["inference"])
    monkeypatch.delenv("PLUGBOARD_INFERENCE_TOKEN_FILE")
    off = ServerConfig.from_args([])
    assert off.tls_cert is off.tls_key is off.tls_client_ca is off.inference_token_file is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-cert", "cert"], "--tls-cert and --tls-key go together"),
        (["--tls-key", "key"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "ca"], "--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key"),
        (["--tls-cert", "cert", "--tls-key", "missing"], "--tls-key: cannot read"),
        (["--tls-cert", "der", "--tls-key", "key"], "is not a PEM file"),
        (["--tls-cert", "cert", "--tls-key", "key", "--tls-client-ca", "admin"], "is not a PEM file"),
        (["--inference-token-file", "missing"], "--inference-token-file: cannot read"),
        (["--inference-token-file", "empty"], "must hold one token"),
        (["--admin-token-file", "spaced"], "must hold one token"),
        (["--admin-token-file", "admin", "--inference-token-file", "same"], "hold the same token"),
    ],
)
def test_bad_security_flags_exit_with_a_clear_message(security_files, args, message, capsys):
    root = security_files["cert"].parent  # "missing" names no file there
    argv = [a if a.startswith("--") else str(root / a) for a in args]
    with pytest.raises(SystemExit) as exc:
        ServerConfig.from_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "admin-token" not in err.replace("admin-token-file", "")  # never the token itself
