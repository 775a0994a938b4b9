"""The routing header: `routing_metadata`, and the sync and async clients sending it on module calls only.

The clients talk to an in-process fake Generation + Adapters servicer (no plugboard server, no model)
that records each call's metadata, so the header crosses a real gRPC channel.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

import plugboard_client
from plugboard.v1 import adapters_pb2 as apb
from plugboard.v1 import adapters_pb2_grpc, generation_pb2_grpc
from plugboard.v1 import generation_pb2 as pb
from plugboard_client import ROUTING_HEADER, AsyncClient, Client, routing_metadata
from plugboard_client.routing import routing_key, with_routing

H = ROUTING_HEADER


def test_the_header_name() -> None:
    # gRPC refuses metadata keys with capitals; proxies match header names case-insensitively anyway.
    assert ROUTING_HEADER == "x-plugboard-adapter" == ROUTING_HEADER.lower()
    assert plugboard_client.routing.ROUTING_HEADER is ROUTING_HEADER


@pytest.mark.parametrize(
    ("adapter", "expected"),
    [
        ("", ()),
        ("sentiment", ((H, "sentiment"),)),
        ("sentiment@7", ((H, "sentiment"),)),
        ("sentiment@prod", ((H, "sentiment"),)),
        ("sentiment@latest", ((H, "sentiment"),)),
        ("rt-lora.v2_x@3", ((H, "rt-lora.v2_x"),)),
        ("Sentiment@1", ((H, "Sentiment"),)),  # as given: the server, not the client, judges names
        ("@7", ()),  # no name: nothing to route by (the server refuses the ref)
        ("café@1", ()),  # not ASCII: gRPC would fail the call locally with "Invalid metadata"
        ("a b", ()),
        ("x\n", ()),
    ],
)
def test_routing_metadata(adapter: str, expected: tuple[tuple[str, str], ...]) -> None:
    assert routing_metadata(adapter) == expected
    assert routing_key(adapter) == (expected[0][1] if expected else "")


def test_every_version_and_alias_of_a_module_routes_alike() -> None:
    refs = ["sentiment", "sentiment@1", "sentiment@2", "sentiment@stable", "sentiment@canary"]
    assert {routing_metadata(ref) for ref in refs} == {((H, "sentiment"),)}


def test_with_routing_keeps_other_metadata_and_sends_one_value() -> None:
    given = (("x-trace", "1"), ("authorization", "Bearer t"))
    assert with_routing(given, "") == given
    assert with_routing(given, "m@2") == (*given, (H, "m"))
    # A client-wide value gives way to the call's own module (any case): one value, the module's.
    pinned = (("X-Plugboard-Adapter", "other"), *given)
    assert with_routing(pinned, "m") == (*given, (H, "m"))
    assert with_routing(pinned, "") == pinned


class Recorder(generation_pb2_grpc.GenerationServicer, adapters_pb2_grpc.AdaptersServicer):
    """Answers every call with an empty reply and records (method, metadata as a list of pairs)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, str]]]] = []

    def _record(self, method: str, context: grpc.ServicerContext) -> None:
        self.calls.append((method, [(m.key, m.value) for m in context.invocation_metadata()]))

    def take(self) -> list[tuple[str, list[str]]]:
        """(method, routing header values) of the calls since the last take."""
        out = [(method, [v for k, v in md if k == H]) for method, md in self.calls]
        self.calls.clear()
        return out

    def Generate(self, request: Any, context: grpc.ServicerContext) -> pb.GenerateResponse:
        self._record("Generate", context)
        return pb.GenerateResponse(adapter=request.adapter)

    def GenerateStream(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._record("GenerateStream", context)
        yield pb.GenerateStreamResponse(text="a")
        yield pb.GenerateStreamResponse(finish_reason=pb.LENGTH)

    def Score(self, request: Any, context: grpc.ServicerContext) -> pb.ScoreResponse:
        self._record("Score", context)
        return pb.ScoreResponse(best=request.choices[0])

    def Tokenize(self, request: Any, context: grpc.ServicerContext) -> pb.TokenizeResponse:
        self._record("Tokenize", context)
        return pb.TokenizeResponse()

    def ModelInfo(self, request: Any, context: grpc.ServicerContext) -> pb.ModelInfoResponse:
        self._record("ModelInfo", context)
        return pb.ModelInfoResponse()

    def GetAdapter(self, request: Any, context: grpc.ServicerContext) -> apb.AdapterInfo:
        self._record("GetAdapter", context)
        return apb.AdapterInfo()

    def LoadAdapter(self, request: Any, context: grpc.ServicerContext) -> apb.AdapterInfo:
        self._record("LoadAdapter", context)
        return apb.AdapterInfo()

    def UnloadAdapter(self, request: Any, context: grpc.ServicerContext) -> apb.AdapterInfo:
        self._record("UnloadAdapter", context)
        return apb.AdapterInfo()


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[Recorder, str]]:
    recorder = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    generation_pb2_grpc.add_GenerationServicer_to_server(recorder, server)
    adapters_pb2_grpc.add_AdaptersServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield recorder, f"127.0.0.1:{port}"
    server.stop(0)


# What a client does, in call order, and the routing header values each call must carry.
EXPECTED = [
    ("Generate", ["sent"]),
    ("Generate", ["sent"]),
    ("Generate", []),
    ("GenerateStream", ["sent"]),
    ("GenerateStream", []),
    ("Score", ["sent"]),
    ("Score", []),
    ("Tokenize", []),
    ("ModelInfo", []),
    ("GetAdapter", []),  # a registry read: any replica answers it alike
    ("LoadAdapter", ["sent"]),
    ("UnloadAdapter", ["sent"]),
]


def test_sync_client_sends_the_header_on_module_calls_only(fake: tuple[Recorder, str]) -> None:
    recorder, target = fake
    recorder.take()
    with Client(target, timeout=10) as c:
        c.generate("hi", adapter="sent@7")
        c.generate("hi", adapter="sent@prod")
        c.generate("hi")
        assert [r.text for r in c.generate_stream("hi", adapter="sent")] == ["a", ""]
        list(c.generate_stream("hi"))
        c.score("hi", choices=["a", "b"], adapter="sent@2")
        c.score("hi", choices=["a", "b"])
        c.tokenize("hi")
        c.model_info()
        c.get_adapter("sent@prod")
        c.load_adapter("sent@3")
        c.unload_adapter("sent")
    assert recorder.take() == EXPECTED


def test_async_client_sends_the_header_on_module_calls_only(fake: tuple[Recorder, str]) -> None:
    recorder, target = fake
    recorder.take()

    async def calls() -> None:
        async with AsyncClient(target, timeout=10) as c:
            await c.generate("hi", adapter="sent@7")
            await c.generate("hi", adapter="sent@prod")
            await c.generate("hi")
            assert [r.text async for r in c.generate_stream("hi", adapter="sent")] == ["a", ""]
            [r async for r in c.generate_stream("hi")]
            await c.score("hi", choices=["a", "b"], adapter="sent@2")
            await c.score("hi", choices=["a", "b"])
            await c.tokenize("hi")
            await c.model_info()
            await c.get_adapter("sent@prod")
            await c.load_adapter("sent@3")
            await c.unload_adapter("sent")

    asyncio.run(calls())
    assert recorder.take() == EXPECTED


def test_token_and_client_metadata_travel_with_the_header(fake: tuple[Recorder, str]) -> None:
    recorder, target = fake
    recorder.take()
    with Client(target, timeout=10, token="s3cret", metadata=[("x-trace", "1")]) as c:
        c.generate("hi", adapter="sent@1")
        c.generate("hi")
    (_, with_module), (_, base) = recorder.calls
    assert ("authorization", "Bearer s3cret") in with_module and ("x-trace", "1") in with_module
    assert (H, "sent") in with_module
    assert ("authorization", "Bearer s3cret") in base and all(k != H for k, _ in base)
    # The client's own metadata is unchanged by the calls.
    assert c.metadata == (("x-trace", "1"), ("authorization", "Bearer s3cret"))


def test_a_client_wide_header_gives_way_to_the_calls_module(fake: tuple[Recorder, str]) -> None:
    recorder, target = fake
    recorder.take()
    with Client(target, timeout=10, metadata=[(H, "pinned")]) as c:
        c.generate("hi", adapter="sent@1")
        c.generate("hi")
    assert recorder.take() == [("Generate", ["sent"]), ("Generate", ["pinned"])]


def test_a_malformed_name_reaches_the_server_without_the_header(fake: tuple[Recorder, str]) -> None:
    # Sending "café" as metadata would fail locally with INTERNAL "Invalid metadata"; left out, the
    # request reaches the server, which answers INVALID_ARGUMENT for the name.
    recorder, target = fake
    recorder.take()
    with Client(target, timeout=10) as c:
        c.generate("hi", adapter="café@1")
    assert recorder.take() == [("Generate", [])]
