"""Transport security (TLS, mutual TLS) and bearer tokens (inference and admin), end to end."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from pathlib import Path

import grpc
import pytest

from plugboard_client import (
    AsyncClient,
    Client,
    NotFound,
    PermissionDenied,
    PlugboardError,
    Unauthenticated,
    Unavailable,
)
from plugboard_client import cli as plugboard_cli
from tests.support import peft_modules as pm
from tests.support.certs import Certs, make_certs
from tests.support.server import ServerThread, server_config

ADMIN, INFERENCE, WRONG = "admin-Tok3n-7f2c", "inference-Tok3n-91ab", "guess-Tok3n-0000"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def token_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokens")
    (root / "admin").write_text(ADMIN + "\n")
    (root / "inference").write_text(INFERENCE + "\n")
    return {"admin_token_file": root / "admin", "inference_token_file": root / "inference"}


def _serve(tiny_model, **config) -> ServerThread:
    return ServerThread(server_config(max_batch_size=4, **config), loader=lambda: tiny_model).start()


@pytest.fixture(scope="module")
def tls_server(tiny_model, certs):
    srv = _serve(tiny_model, tls_cert=certs.server_cert, tls_key=certs.server_key)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def mtls_server(tiny_model, certs, token_files):
    """Mutual TLS and the inference token: both checks at once, as a locked-down deployment runs."""
    srv = _serve(
        tiny_model,
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        tls_client_ca=certs.ca,
        inference_token_file=token_files["inference_token_file"],
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def token_server(tiny_model, token_files):
    srv = _serve(tiny_model, **token_files)
    yield srv
    srv.stop()


def _generates(client: Client) -> None:
    assert client.generate("secure", max_new_tokens=3, ignore_eos=True).generated_tokens == 3


# TLS


def test_tls_handshake_and_generate(tls_server, certs):
    with Client(tls_server.target, timeout=30, tls_ca=certs.ca) as c:
        _generates(c)
        assert c.health() == "SERVING"

    async def async_generate() -> int:
        async with AsyncClient(tls_server.target, timeout=30, tls_ca=str(certs.ca)) as c:
            return (await c.generate("secure", max_new_tokens=2, ignore_eos=True)).generated_tokens

    assert asyncio.run(async_generate()) == 2


def test_tls_server_name_override(tls_server, certs):
    port = tls_server.server.port
    # The certificate names localhost and 127.0.0.1; the override is what gets checked.
    with Client(f"127.0.0.1:{port}", timeout=30, tls_ca=certs.ca, tls_server_name="localhost") as c:
        _generates(c)
    with (
        Client(f"127.0.0.1:{port}", timeout=10, tls_ca=certs.ca, tls_server_name="elsewhere.test") as c,
        pytest.raises(Unavailable),
    ):
        c.model_info()


def test_plaintext_client_is_refused_by_a_tls_server(tls_server):
    with Client(tls_server.target, timeout=10) as c, pytest.raises(Unavailable):
        c.model_info()


def test_client_trusting_another_ca_is_refused(tls_server, certs):
    with Client(tls_server.target, timeout=10, tls_ca=certs.other_ca) as c, pytest.raises(Unavailable):
        c.model_info()


def test_tls_client_to_a_plaintext_server_fails(token_server, certs):
    with Client(token_server.target, timeout=10, tls_ca=certs.ca) as c, pytest.raises(Unavailable):
        c.health()


# Mutual TLS


def test_mtls_with_a_client_certificate(mtls_server, certs):
    kw = dict(tls_ca=certs.ca, tls_cert=certs.client_cert, tls_key=certs.client_key)
    with Client(mtls_server.target, timeout=30, token=INFERENCE, **kw) as c:
        _generates(c)
    with Client(mtls_server.target, timeout=30, **kw) as c:  # the handshake passes, the token check not
        assert c.health() == "SERVING"
        with pytest.raises(Unauthenticated):
            c.model_info()


def test_mtls_refuses_a_client_without_a_certificate(mtls_server, certs):
    with Client(mtls_server.target, timeout=10, token=INFERENCE, tls_ca=certs.ca) as c:
        with pytest.raises(Unavailable):
            c.model_info()
        with pytest.raises(Unavailable):
            c.health()  # no certificate, no connection: not even the health check


def test_mtls_refuses_a_certificate_from_another_ca(mtls_server, certs):
    kw = dict(tls_ca=certs.ca, tls_cert=certs.other_client_cert, tls_key=certs.other_client_key)
    with Client(mtls_server.target, timeout=10, token=INFERENCE, **kw) as c, pytest.raises(Unavailable):
        c.model_info()


# Tokens


def test_no_token_is_unauthenticated(token_server):
    with Client(token_server.target, timeout=30) as c:
        for call in (
            lambda: c.generate("x", max_new_tokens=1),
            lambda: list(c.generate_stream("x", max_new_tokens=1)),
            lambda: c.score("x", choices=["a", "b"]),
            lambda: c.tokenize("x"),
            lambda: c.model_info(),
            lambda: c.list_adapters(),
            lambda: c.get_adapter("anything"),
        ):
            with pytest.raises(Unauthenticated, match="needs the inference token"):
                call()
        with pytest.raises(Unauthenticated, match="needs the admin token"):
            c.delete_adapter("anything")


def test_refused_calls_are_counted_in_the_metrics(token_server):
    def refused(code: str) -> float:
        text = urllib.request.urlopen(token_server.metrics_url, timeout=10).read().decode()
        labels = ('method="Generate"', f'code="{code}"')
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("plugboard_requests_total{") and all(label in line for label in labels)
        )

    before = refused("UNAUTHENTICATED"), refused("PERMISSION_DENIED")
    for token, error in ((None, Unauthenticated), (WRONG, PermissionDenied)):
        with Client(token_server.target, timeout=30, token=token) as c, pytest.raises(error):
            c.generate("x", max_new_tokens=1)
    assert (refused("UNAUTHENTICATED"), refused("PERMISSION_DENIED")) == (before[0] + 1, before[1] + 1)


def test_wrong_token_is_permission_denied_and_not_echoed(token_server):
    with Client(token_server.target, timeout=30, token=WRONG) as c:
        for call in (
            lambda: c.generate("x", max_new_tokens=1),
            lambda: list(c.generate_stream("x", max_new_tokens=1)),
            lambda: c.list_adapters(),
            lambda: c.set_alias("m", "stable", 1),
        ):
            with pytest.raises(PermissionDenied, match="token is wrong") as err:
                call()
            assert WRONG not in str(err.value)
    # A value that is not even a bearer token is wrong too, not missing.
    basic = [("authorization", "Basic abc")]
    with Client(token_server.target, timeout=30, metadata=basic) as c, pytest.raises(PermissionDenied):
        c.model_info()


def test_inference_token_serves_generation_and_reading(token_server):
    with Client(token_server.target, timeout=30, token=INFERENCE) as c:
        _generates(c)
        assert "".join(m.text for m in c.generate_stream("x", max_new_tokens=2, ignore_eos=True))
        assert c.score("x", choices=["a", "b"]).best in ("a", "b")
        assert c.tokenize("x").token_ids
        assert c.model_info().max_context_tokens > 0
        c.list_adapters()
        with pytest.raises(NotFound):  # past the token check, into the registry
            c.get_adapter("nothing-here")


def test_admin_token_serves_generation_too(token_server):
    with Client(token_server.target, timeout=30, token=ADMIN) as c:
        _generates(c)
        c.list_adapters()


def test_inference_token_is_refused_for_admin_rpcs(token_server, tiny_model_dir, tmp_path):
    module = pm.prompt_tuning(tiny_model_dir, tmp_path / "pt", tokens=4, seed=3)
    with Client(token_server.target, timeout=60, token=INFERENCE) as c:
        for call in (
            lambda: c.register_adapter(module, name="secured"),  # a client stream
            lambda: c.delete_adapter("secured"),
            lambda: c.set_alias("secured", "stable", 1),
            lambda: c.load_adapter("secured"),
            lambda: c.unload_adapter("secured"),
        ):
            with pytest.raises(PermissionDenied, match="inference token is not enough"):
                call()
    with Client(token_server.target, timeout=60, token=ADMIN) as admin:
        info = admin.register_adapter(module, name="secured", alias="stable")
    with Client(token_server.target, timeout=30, token=INFERENCE) as c:
        assert c.get_adapter("secured@stable").version == info.version
        c.generate("x", adapter="secured", max_new_tokens=1)
    with Client(token_server.target, timeout=60, token=ADMIN) as admin:
        admin.delete_adapter("secured", force=True)


def test_health_and_reflection_need_no_token(token_server):
    with Client(token_server.target, timeout=30) as c:
        c.wait_ready(10)
        assert c.health() == "SERVING"
        assert c.health("plugboard.v1.Generation") == "SERVING"
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(token_server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (reply,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        assert "plugboard.v1.Generation" in {s.name for s in reply.list_services_response.service}


def test_tokens_never_reach_the_log(tiny_model, token_files, caplog):
    caplog.set_level(logging.DEBUG)
    srv = _serve(tiny_model, **token_files)
    try:
        for token in (None, WRONG, INFERENCE, ADMIN):
            with Client(srv.target, timeout=30, token=token) as c:
                try:
                    c.generate("x", max_new_tokens=1)
                    c.delete_adapter("nope")
                except PlugboardError:
                    pass
    finally:
        srv.stop()
    text = caplog.text + "".join(r.getMessage() for r in caplog.records)
    assert "tokens: admin, inference" in text and "refused /plugboard.v1." in text
    for secret in (ADMIN, INFERENCE, WRONG):
        assert secret not in text


# The CLI


def test_cli_over_mutual_tls(mtls_server, certs, token_files, capsys):
    tls = [
        "--tls-ca",
        str(certs.ca),
        "--tls-cert",
        str(certs.client_cert),
        "--tls-key",
        str(certs.client_key),
    ]
    base = ["--target", mtls_server.target, "--timeout", "30", *tls]
    assert plugboard_cli.main([*base, "health"]) == 0
    assert capsys.readouterr().out == "SERVING\n"
    token = ["--token-file", str(token_files["inference_token_file"])]
    argv = [*base, *token, "generate", "--raw", "hello", "--max-new-tokens", "3", "--json"]
    assert plugboard_cli.main(argv) == 0
    assert 1 <= json.loads(capsys.readouterr().out)["generated_tokens"] <= 3
    assert plugboard_cli.main([*base, "info"]) == 1  # no token
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    no_cert = ["--target", mtls_server.target, "--timeout", "10", "--tls-ca", str(certs.ca), *token]
    assert plugboard_cli.main([*no_cert, "info"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        plugboard_cli.main([*no_cert, "--tls-cert", str(certs.client_cert), "info"])
    assert exc.value.code == 2
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
