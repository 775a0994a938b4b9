"""The routing header reaches a real plugboard server: sync client, async client and the CLI.

A recording server interceptor goes in front of the server's own (auth, malformed-request) ones, so it
sees every call's metadata as a proxy in front of the replica would. PlugboardServer has no hook for
extra interceptors, so the fixture wraps `grpc.aio.server` while the server starts.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable, Iterator
from contextlib import redirect_stdout
from typing import Any

import grpc
import grpc.aio
import pytest

from plugboard_client import ROUTING_HEADER, AsyncClient, Client, InvalidArgument, NotFound, cli
from plugboard_server.models.loading import load_model
from tests.support import peft_modules as pm
from tests.support.server import ServerThread, server_config

TOKEN = "s3cret-admin-token"
MODULE = "greeter"


class RecordingInterceptor(grpc.aio.ServerInterceptor):
    """Records (method name, routing header values, has authorization) of every call, before any check."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], bool]] = []

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        metadata = details.invocation_metadata or ()
        values = [m.value for m in metadata if m.key == ROUTING_HEADER]
        has_token = any(m.key == "authorization" for m in metadata)
        self.calls.append((details.method.rpartition("/")[2], values, has_token))
        return await continuation(details)

    def take(self) -> list[tuple[str, list[str]]]:
        """(method, routing header values) of the plugboard calls since the last take."""
        out = [(method, values) for method, values, _ in self.calls if method != "Check"]
        self.calls.clear()
        return out


@pytest.fixture(scope="module")
def routed(tmp_path_factory, tiny_model_dir) -> Iterator[tuple[ServerThread, RecordingInterceptor]]:
    root = tmp_path_factory.mktemp("routing")
    pm.prefix(tiny_model_dir, root / "modules" / MODULE, tokens=4, seed=3)
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    recorder = RecordingInterceptor()
    real_server = grpc.aio.server

    def server_with_recorder(*args: Any, interceptors: Any = (), **kwargs: Any) -> grpc.aio.Server:
        return real_server(*args, interceptors=[recorder, *interceptors], **kwargs)

    config = server_config(
        registry=root / "registry",
        adapters_dir=root / "modules",
        admin_token_file=token_file,
        max_loaded_adapters=2,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grpc.aio, "server", server_with_recorder)
        srv = ServerThread(config, loader=lambda: load_model(str(tiny_model_dir))).start()
    yield srv, recorder
    srv.stop()


def test_sync_client(routed) -> None:
    srv, recorder = routed
    recorder.take()
    with Client(srv.target, timeout=60) as c:
        assert c.generate("Hi", adapter=f"{MODULE}@1", max_new_tokens=2).adapter == f"{MODULE}@1"
        assert c.generate("Hi", adapter=f"{MODULE}@latest", max_new_tokens=2).adapter == f"{MODULE}@1"
        assert c.generate("Hi", max_new_tokens=2).adapter == ""
        parts = list(c.generate_stream("Hi", adapter=MODULE, max_new_tokens=2))
        assert parts[-1].adapter == f"{MODULE}@1"
        assert c.score("Hi", choices=["yes", "no"], adapter=MODULE).adapter == f"{MODULE}@1"
        c.tokenize("Hi")
        with pytest.raises(NotFound):  # the header goes out before the server knows the module
            c.generate("Hi", adapter="missing@4", max_new_tokens=2)
        with pytest.raises(InvalidArgument):  # a name gRPC cannot carry: no header, the server says why
            c.generate("Hi", adapter="café", max_new_tokens=2)
    assert recorder.take() == [
        ("Generate", [MODULE]),
        ("Generate", [MODULE]),
        ("Generate", []),
        ("GenerateStream", [MODULE]),
        ("Score", [MODULE]),
        ("Tokenize", []),
        ("Generate", ["missing"]),
        ("Generate", []),
    ]


def test_async_client(routed) -> None:
    srv, recorder = routed
    recorder.take()

    async def calls() -> None:
        async with AsyncClient(srv.target, timeout=60) as c:
            await c.generate("Hi", adapter=f"{MODULE}@1", max_new_tokens=2)
            await c.generate("Hi", max_new_tokens=2)
            parts = [p async for p in c.generate_stream("Hi", adapter=f"{MODULE}@latest", max_new_tokens=2)]
            assert parts[-1].adapter == f"{MODULE}@1"
            await c.score("Hi", choices=["yes", "no"], adapter=MODULE)

    asyncio.run(calls())
    assert recorder.take() == [
        ("Generate", [MODULE]),
        ("Generate", []),
        ("GenerateStream", [MODULE]),
        ("Score", [MODULE]),
    ]


def test_load_and_unload_are_routed_and_keep_the_admin_token(routed) -> None:
    srv, recorder = routed
    recorder.take()
    with Client(srv.target, timeout=60, token=TOKEN) as c:
        assert c.load_adapter(f"{MODULE}@1").pinned
        assert not c.unload_adapter(MODULE).pinned
        c.get_adapter(MODULE)
    assert [(method, token) for method, _, token in recorder.calls] == [
        ("LoadAdapter", True),
        ("UnloadAdapter", True),
        ("GetAdapter", True),
    ]
    assert recorder.take() == [("LoadAdapter", [MODULE]), ("UnloadAdapter", [MODULE]), ("GetAdapter", [])]


def test_cli_goes_through_the_client(routed) -> None:
    srv, recorder = routed
    recorder.take()
    base = ["--target", srv.target, "--timeout", "60"]
    out = io.StringIO()
    with redirect_stdout(out):
        assert (
            cli.main([*base, "generate", "Hi", "--raw", "--adapter", f"{MODULE}@1", "--max-new-tokens", "2"])
            == 0
        )
        assert cli.main([*base, "generate", "Hi", "--raw", "--max-new-tokens", "2", "--stream"]) == 0
        assert cli.main([*base, "score", "Hi", "--raw", "--adapter", MODULE, "--choices", "yes,no"]) == 0
    assert recorder.take() == [("Generate", [MODULE]), ("GenerateStream", []), ("Score", [MODULE])]
