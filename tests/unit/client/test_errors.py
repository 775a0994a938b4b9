"""Mapping failed RPCs to plugboard_client exceptions, and reading the server's retry pushback."""

from __future__ import annotations

import socket
from collections.abc import Sequence

import grpc
import grpc.aio
import pytest

import plugboard_client
from plugboard_client import errors
from plugboard_client.errors import (
    PlugboardError,
    ResourceExhausted,
    Unavailable,
    from_rpc_error,
    retry_after_seconds,
)


class FakeRpcError(grpc.RpcError):
    """What a failed sync call raises: an RpcError that is also a grpc.Call."""

    def __init__(
        self, code: grpc.StatusCode, details: str | None = "", trailers: Sequence[tuple[str, str]] = ()
    ) -> None:
        self._code, self._details, self._trailers = code, details, tuple(trailers)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailers

    def debug_error_string(self) -> str:
        return "debug"


EXPECTED = {
    grpc.StatusCode.INVALID_ARGUMENT: plugboard_client.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: plugboard_client.NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: plugboard_client.ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: plugboard_client.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: plugboard_client.DeadlineExceeded,
    grpc.StatusCode.CANCELLED: plugboard_client.Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: plugboard_client.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: plugboard_client.PermissionDenied,
    grpc.StatusCode.ALREADY_EXISTS: plugboard_client.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: plugboard_client.FailedPrecondition,
    grpc.StatusCode.UNIMPLEMENTED: plugboard_client.Unimplemented,
    grpc.StatusCode.INTERNAL: plugboard_client.Internal,
}


@pytest.mark.parametrize(("code", "cls"), EXPECTED.items())
def test_each_code_maps_to_its_class(code: grpc.StatusCode, cls: type[PlugboardError]) -> None:
    exc = from_rpc_error(FakeRpcError(code, "why"))
    assert type(exc) is cls
    assert isinstance(exc, PlugboardError)
    assert exc.code == code and exc.details == "why"
    assert exc.retry_after is None
    assert exc.debug_error_string == "debug"
    assert str(exc) == f"{code.name}: why"


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED, grpc.StatusCode.DATA_LOSS]
)
def test_codes_without_a_class_give_the_base_class(code: grpc.StatusCode) -> None:
    exc = from_rpc_error(FakeRpcError(code, "x"))
    assert type(exc) is PlugboardError and exc.code == code


def test_retry_after_from_trailing_metadata() -> None:
    err = FakeRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "queue full",
        [("other", "1"), (errors.RETRY_PUSHBACK_KEY, "1500")],
    )
    exc = from_rpc_error(err)
    assert isinstance(exc, ResourceExhausted)
    assert exc.retry_after == pytest.approx(1.5)


def test_retry_after_from_aio_error() -> None:
    err = grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.aio.Metadata(),
        grpc.aio.Metadata((errors.RETRY_PUSHBACK_KEY, "250")),
        details="busy",
    )
    exc = from_rpc_error(err)
    assert isinstance(exc, ResourceExhausted)
    assert exc.details == "busy" and exc.retry_after == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (None, None),
        ((), None),
        (((errors.RETRY_PUSHBACK_KEY, "0"),), 0.0),
        (((errors.RETRY_PUSHBACK_KEY, b"2000"),), 2.0),
        (((errors.RETRY_PUSHBACK_KEY, " 30 "),), 0.03),
        (((errors.RETRY_PUSHBACK_KEY, "-1"),), None),  # gRPC: negative means "do not retry"
        (((errors.RETRY_PUSHBACK_KEY, "soon"),), None),
        ((("grpc-retry-pushback", "5"),), None),
        (("garbage",), None),
    ],
)
def test_retry_after_parsing(metadata: object, expected: float | None) -> None:
    assert retry_after_seconds(metadata) == (pytest.approx(expected) if expected is not None else None)


def test_an_rpc_error_that_is_not_a_call_is_unknown() -> None:
    exc = from_rpc_error(grpc.RpcError())
    assert type(exc) is PlugboardError
    assert exc.code == grpc.StatusCode.UNKNOWN and exc.details == "" and exc.retry_after is None


def test_missing_details_become_empty() -> None:
    assert from_rpc_error(FakeRpcError(grpc.StatusCode.INTERNAL, None)).details == ""


def test_classes_constructed_directly_carry_their_code() -> None:
    exc = plugboard_client.NotFound("no adapter 'x'")
    assert exc.code == grpc.StatusCode.NOT_FOUND
    assert str(exc) == "NOT_FOUND: no adapter 'x'"
    assert PlugboardError("x", code=grpc.StatusCode.ABORTED).code == grpc.StatusCode.ABORTED


def _closed_port() -> str:
    # A port that was free a moment ago: connecting is refused at once, no server needed.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_a_real_failed_sync_call_maps_to_unavailable() -> None:
    with plugboard_client.Client(_closed_port(), timeout=10) as client:
        with pytest.raises(Unavailable) as info:
            client.model_info()
        assert isinstance(info.value.__cause__, grpc.RpcError)
        with pytest.raises(Unavailable):
            next(client.generate_stream("x"))


async def test_a_real_failed_aio_call_maps_to_unavailable() -> None:
    async with plugboard_client.AsyncClient(_closed_port(), timeout=10) as client:
        with pytest.raises(Unavailable) as info:
            await client.health()
        assert isinstance(info.value.__cause__, grpc.aio.AioRpcError)
        with pytest.raises(Unavailable):
            async for _ in client.generate_stream("x"):
                pass


def test_wait_ready_gives_up_with_deadline_exceeded() -> None:
    with plugboard_client.Client(_closed_port()) as client, pytest.raises(plugboard_client.DeadlineExceeded):
        client.wait_ready(0.3)


def test_argument_errors_raise_before_any_call() -> None:
    with plugboard_client.Client(_closed_port()) as client:
        with pytest.raises(ValueError):
            client.generate("x", messages=[("user", "y")])
        with pytest.raises(ValueError):
            client.generate_stream()
