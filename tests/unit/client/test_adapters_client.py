"""The clients' Adapters methods: requests, paging, the admin token, error mapping, streamed uploads.

Most tests swap the stub for a recorder; the upload tests run an in-process fake Adapters servicer so the
client-streaming call and its metadata cross a real gRPC channel (no plugboard server involved).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

import plugboard_client
from plugboard.v1 import adapters_pb2 as apb
from plugboard.v1 import adapters_pb2_grpc
from plugboard_client import AsyncClient, Client, adapters
from tests.unit.client.test_errors import FakeRpcError


class RecordingStub:
    """Stands in for AdaptersStub: records (method, request, kwargs); answers from `answers`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, dict[str, Any]]] = []
        self.pages: dict[str, apb.ListAdaptersResponse] = {}
        self.fail: grpc.RpcError | None = None

    def __getattr__(self, method: str) -> Any:
        def call(request: Any, **kwargs: Any) -> Any:
            self.calls.append((method, request, kwargs))
            if self.fail is not None:
                raise self.fail
            if method == "ListAdapters":
                return self.pages[request.page_token]
            if method == "DeleteAdapter":
                return apb.DeleteAdapterResponse(deleted=[request.adapter])
            return apb.AdapterInfo(name="sent", version=3, ref="sent@3")

        return call


@pytest.fixture
def stubbed() -> Iterator[tuple[Client, RecordingStub]]:
    with Client("127.0.0.1:1", timeout=7, token="s3cret", metadata=[("x-trace", "1")]) as client:
        stub = RecordingStub()
        client._adapters = stub  # type: ignore[assignment]
        yield client, stub


def test_token_goes_into_every_calls_metadata(stubbed: tuple[Client, RecordingStub]) -> None:
    client, stub = stubbed
    assert client.metadata == (("x-trace", "1"), ("authorization", "Bearer s3cret"))
    client.get_adapter("sent@prod")
    client.load_adapter("sent", timeout=2)
    (_, _, first), (_, _, second) = stub.calls
    assert first == {"timeout": 7, "metadata": client.metadata}
    assert second["timeout"] == 2 and ("authorization", "Bearer s3cret") in second["metadata"]


def test_no_token_no_authorization() -> None:
    with Client("127.0.0.1:1") as client:
        assert client.metadata == ()


@pytest.mark.parametrize("token", ["", "s3cret\n", " s3cret", "s3 cret", "sécret"])
def test_malformed_tokens_are_refused(token: str) -> None:
    with pytest.raises(ValueError, match="token"):
        Client("127.0.0.1:1", token=token)
    with pytest.raises(ValueError, match="token"):
        plugboard_client.client.call_metadata((), token)


def test_token_and_authorization_metadata_conflict() -> None:
    with pytest.raises(ValueError, match="not both"):
        Client("127.0.0.1:1", token="t", metadata=[("Authorization", "Bearer u")])


def test_requests(stubbed: tuple[Client, RecordingStub]) -> None:
    client, stub = stubbed
    stub.pages[""] = apb.ListAdaptersResponse()
    client.list_adapters(
        kind="lora", tag="t", name_prefix="se", all_versions=True, page_size=3, page_token=""
    )
    assert client.get_adapter("sent@2") == apb.AdapterInfo(name="sent", version=3, ref="sent@3")
    assert list(client.delete_adapter("sent@2", force=True).deleted) == ["sent@2"]
    client.set_alias("sent", "prod", 2)
    client.load_adapter("sent@prod")
    client.unload_adapter("sent")
    assert [(m, r) for m, r, _ in stub.calls] == [
        (
            "ListAdapters",
            apb.ListAdaptersRequest(kind=apb.LORA, tag="t", name_prefix="se", all_versions=True, page_size=3),
        ),
        ("GetAdapter", apb.GetAdapterRequest(adapter="sent@2")),
        ("DeleteAdapter", apb.DeleteAdapterRequest(adapter="sent@2", force=True)),
        ("SetAlias", apb.SetAliasRequest(name="sent", alias="prod", version=2)),
        ("LoadAdapter", apb.LoadAdapterRequest(adapter="sent@prod")),
        ("UnloadAdapter", apb.UnloadAdapterRequest(adapter="sent")),
    ]


def _pages() -> dict[str, apb.ListAdaptersResponse]:
    return {
        "": apb.ListAdaptersResponse(
            adapters=[apb.AdapterInfo(name="a"), apb.AdapterInfo(name="b")], next_page_token="p2"
        ),
        "p2": apb.ListAdaptersResponse(adapters=[apb.AdapterInfo(name="c")], next_page_token="p3"),
        "p3": apb.ListAdaptersResponse(),
    }


def test_iter_adapters_follows_the_page_tokens(stubbed: tuple[Client, RecordingStub]) -> None:
    client, stub = stubbed
    stub.pages = _pages()
    assert [i.name for i in client.iter_adapters(tag="t", page_size=2)] == ["a", "b", "c"]
    assert [(r.page_token, r.tag, r.page_size) for _, r, _ in stub.calls] == [
        ("", "t", 2),
        ("p2", "t", 2),
        ("p3", "t", 2),
    ]


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, plugboard_client.Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, plugboard_client.PermissionDenied),
        (grpc.StatusCode.FAILED_PRECONDITION, plugboard_client.FailedPrecondition),
        (grpc.StatusCode.ALREADY_EXISTS, plugboard_client.AlreadyExists),
        (grpc.StatusCode.NOT_FOUND, plugboard_client.NotFound),
    ],
)
def test_errors_are_mapped(
    stubbed: tuple[Client, RecordingStub], code: grpc.StatusCode, cls: type[Exception]
) -> None:
    client, stub = stubbed
    stub.fail = FakeRpcError(code, "why")
    with pytest.raises(cls):
        client.delete_adapter("sent")
    with pytest.raises(cls):
        next(client.iter_adapters())


# A fake Adapters servicer on a real channel, for the client-streaming upload.


class FakeAdapters(adapters_pb2_grpc.AdaptersServicer):
    def __init__(self) -> None:
        self.header: apb.RegisterAdapterHeader | None = None
        self.files: dict[str, bytearray] = {}
        self.metadata: dict[str, str] = {}

    def RegisterAdapter(self, request_iterator: Any, context: grpc.ServicerContext) -> apb.AdapterInfo:
        self.metadata = dict(context.invocation_metadata())
        if self.metadata.get("authorization") != "Bearer s3cret":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "this call needs the admin token")
        self.header, self.files = None, {}
        for request in request_iterator:
            if request.HasField("header"):
                self.header = request.header
                continue
            buf = self.files.setdefault(request.chunk.filename, bytearray())
            assert request.chunk.offset == len(buf)
            buf += request.chunk.data
        assert self.header is not None
        return apb.AdapterInfo(
            name=self.header.name,
            version=1,
            ref=f"{self.header.name}@1",
            sha256={n: hashlib.sha256(bytes(d)).hexdigest() for n, d in self.files.items()},
        )

    def ListAdapters(self, request: apb.ListAdaptersRequest, context: grpc.ServicerContext) -> Any:
        return _pages()[request.page_token]


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[str, FakeAdapters]]:
    servicer = FakeAdapters()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    adapters_pb2_grpc.add_AdaptersServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    (tmp_path / "adapter_config.json").write_bytes(b'{"peft_type": "LORA"}')
    (tmp_path / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "optimizer.pt").write_bytes(b"never sent")
    return tmp_path


def _check_upload(servicer: FakeAdapters, info: apb.AdapterInfo, adapter_dir: Path) -> None:
    assert info.ref == "sent@1"
    assert servicer.header is not None and servicer.header.name == "sent" and servicer.header.alias == "prod"
    assert set(servicer.files) == {"adapter_config.json", "adapter_model.safetensors"}
    for f in servicer.header.files:
        assert bytes(servicer.files[f.filename]) == (adapter_dir / f.filename).read_bytes()
        assert info.sha256[f.filename] == f.sha256


def test_sync_register_streams_over_a_real_channel(
    fake_server: tuple[str, FakeAdapters], adapter_dir: Path
) -> None:
    target, servicer = fake_server
    with Client(target, timeout=10, token="s3cret") as client:
        info = client.register_adapter(adapter_dir, name="sent", alias="prod", chunk_size=1000)
    _check_upload(servicer, info, adapter_dir)
    with Client(target, timeout=10) as client, pytest.raises(plugboard_client.Unauthenticated):
        client.register_adapter(adapter_dir, name="sent")


async def test_async_register_and_iter(fake_server: tuple[str, FakeAdapters], adapter_dir: Path) -> None:
    target, servicer = fake_server
    async with AsyncClient(target, timeout=10, token="s3cret") as client:
        info = await client.register_adapter(adapter_dir, name="sent", alias="prod", chunk_size=1000)
        _check_upload(servicer, info, adapter_dir)
        assert servicer.metadata["authorization"] == "Bearer s3cret"
        assert [i.name async for i in client.iter_adapters()] == ["a", "b", "c"]
        with pytest.raises(ValueError, match="no such directory"):
            await client.register_adapter(adapter_dir / "nope", name="sent")
    async with AsyncClient(target, timeout=10) as client:
        with pytest.raises(plugboard_client.Unauthenticated):
            await client.register_adapter(adapter_dir, name="sent")


def _failing_upload(*args: Any, **kwargs: Any) -> Iterator[apb.RegisterAdapterRequest]:
    yield apb.RegisterAdapterRequest(header=apb.RegisterAdapterHeader(name="sent"))
    raise OSError("disk went away")


def test_a_read_error_mid_upload_is_raised_not_cancelled(
    fake_server: tuple[str, FakeAdapters], adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(adapters, "upload_requests", _failing_upload)
    with Client(fake_server[0], timeout=10, token="s3cret") as client, pytest.raises(OSError, match="disk"):
        client.register_adapter(adapter_dir, name="sent")


async def test_a_read_error_mid_async_upload_is_raised_not_cancelled(
    fake_server: tuple[str, FakeAdapters], adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(adapters, "upload_requests", _failing_upload)
    async with AsyncClient(fake_server[0], timeout=10, token="s3cret") as client:
        with pytest.raises(OSError, match="disk"):
            await client.register_adapter(adapter_dir, name="sent")
