"""The client's TLS options: credentials from PEM files, the checks before any connection, the CLI flags."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from plugboard_client import AsyncClient, Client, channel_credentials, cli
from plugboard_client.tls import channel_security

PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


@pytest.fixture
def pem(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    path.write_bytes(PEM)
    return path


def test_channel_credentials(pem: Path) -> None:
    assert isinstance(channel_credentials(pem), grpc.ChannelCredentials)
    assert isinstance(channel_credentials(), grpc.ChannelCredentials)  # the system's roots
    assert isinstance(channel_credentials(str(pem), pem, pem), grpc.ChannelCredentials)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cert": "PEM"}, "tls_cert and tls_key go together"),
        ({"key": "PEM"}, "tls_cert and tls_key go together"),
        ({"ca": "missing.pem"}, "cannot read the TLS CA file"),
        ({"ca": "NOTPEM"}, "is not PEM"),
    ],
)
def test_channel_credentials_refuses(pem: Path, tmp_path: Path, kwargs: dict, message: str) -> None:
    (tmp_path / "not.pem").write_bytes(b"\x30\x82")
    paths = {"PEM": pem, "NOTPEM": tmp_path / "not.pem", "missing.pem": tmp_path / "missing.pem"}
    with pytest.raises(ValueError, match=message):
        channel_credentials(**{k: paths[v] for k, v in kwargs.items()})


def test_channel_security(pem: Path) -> None:
    assert channel_security(None, [("a", 1)]) == (None, [("a", 1)])  # plaintext
    creds, opts = channel_security(None, None, tls_ca=pem, tls_server_name="server.test")
    assert creds is not None and opts == [("grpc.ssl_target_name_override", "server.test")]
    assert channel_security(None, None, tls=True)[0] is not None
    with pytest.raises(ValueError, match="TLS channels only"):
        channel_security(None, None, tls_server_name="server.test")
    with pytest.raises(ValueError, match="not both"):
        channel_security(grpc.ssl_channel_credentials(), None, tls_ca=pem)


def test_clients_take_the_tls_options(pem: Path) -> None:
    with Client("127.0.0.1:1", tls_ca=pem, tls_server_name="x.test") as c:
        assert c.target == "127.0.0.1:1"
    with pytest.raises(ValueError, match="go together"):
        Client("127.0.0.1:1", tls_ca=pem, tls_cert=pem)

    async def make() -> None:
        async with AsyncClient("127.0.0.1:1", tls=True):
            pass
        with pytest.raises(ValueError, match="go together"):
            AsyncClient("127.0.0.1:1", tls_key=pem)

    import asyncio

    asyncio.run(make())


class _Fake:
    def __init__(self, target: str, **kwargs) -> None:
        self.kwargs = kwargs

    def health(self, service: str = "") -> str:
        return "SERVING"

    def close(self) -> None:
        pass


def _cli_kwargs(*argv: str) -> dict:
    made: list[_Fake] = []

    def factory(target: str, **kwargs) -> _Fake:
        made.append(_Fake(target, **kwargs))
        return made[-1]

    assert cli.main([*argv, "health"], client_factory=factory) == 0  # type: ignore[arg-type]
    return made[0].kwargs


def test_cli_passes_tls_options_only_when_given(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("PLUGBOARD_TLS_CA", "PLUGBOARD_TLS_CLIENT_CERT", "PLUGBOARD_TLS_CLIENT_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("PLUGBOARD_TLS_SERVER_NAME", raising=False)
    assert _cli_kwargs() == {"timeout": None}
    got = _cli_kwargs(
        "--tls-ca", "ca.pem", "--tls-cert", "c.pem", "--tls-key", "c.key", "--tls-server-name", "s"
    )
    assert got == {
        "timeout": None,
        "tls_ca": Path("ca.pem"),
        "tls_cert": Path("c.pem"),
        "tls_key": Path("c.key"),
        "tls_server_name": "s",
    }
    assert _cli_kwargs("--tls") == {"timeout": None, "tls": True}
    monkeypatch.setenv("PLUGBOARD_TLS_CA", "env-ca.pem")
    monkeypatch.setenv("PLUGBOARD_TLS_CLIENT_CERT", "env.pem")
    monkeypatch.setenv("PLUGBOARD_TLS_CLIENT_KEY", "env.key")
    got = _cli_kwargs()
    assert (got["tls_ca"], got["tls_cert"], got["tls_key"]) == (
        Path("env-ca.pem"),
        Path("env.pem"),
        Path("env.key"),
    )


def test_cli_half_a_client_pair_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--tls-key", "c.key", "health"], client_factory=_Fake)  # type: ignore[arg-type]
    assert exc.value.code == 2
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err


def test_cli_unreadable_ca_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--tls-ca", str(tmp_path / "none.pem"), "health"]) == 1
    assert "cannot read the TLS CA file" in capsys.readouterr().err
