"""Typed exceptions for failed plugboard RPCs, one class per gRPC status code the server uses.

Every client method raises these instead of bare `grpc.RpcError`, so callers can write
`except plugboard_client.ResourceExhausted as e: time.sleep(e.retry_after or 1)`.
"""

from __future__ import annotations

from typing import Any

import grpc

# The server sends this with RESOURCE_EXHAUSTED (gRPC's own retry-pushback key, in milliseconds).
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


class PlugboardError(Exception):
    """A failed RPC: `code` (grpc.StatusCode), `details` (the server's message), `retry_after` (seconds).

    Also raised directly for status codes that have no subclass here (UNKNOWN, ABORTED, ...).
    """

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        details: str = "",
        *,
        code: grpc.StatusCode | None = None,
        retry_after: float | None = None,
        debug_error_string: str | None = None,
    ) -> None:
        super().__init__(details)
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.details: str = details
        # Seconds the server asked us to wait before retrying; None when it did not say.
        self.retry_after: float | None = retry_after
        self.debug_error_string: str | None = debug_error_string

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class InvalidArgument(PlugboardError):
    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(PlugboardError):
    default_code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(PlugboardError):
    """The server is overloaded (`retry_after`: how long it asked us to back off), or, with no
    `retry_after`, out of something a retry will not bring back soon (the registry's disk is full)."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(PlugboardError):
    """The server is unreachable, still loading its model, or shutting down."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(PlugboardError):
    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(PlugboardError):
    default_code = grpc.StatusCode.CANCELLED


class Unauthenticated(PlugboardError):
    """E.g. an admin RPC sent without a token (see `Client(token=...)`)."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(PlugboardError):
    """E.g. a wrong admin token."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class AlreadyExists(PlugboardError):
    default_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(PlugboardError):
    """E.g. an adapter built for a different base model."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(PlugboardError):
    default_code = grpc.StatusCode.UNIMPLEMENTED


class Internal(PlugboardError):
    default_code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[PlugboardError]] = {
    cls.default_code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Unauthenticated,
        PermissionDenied,
        AlreadyExists,
        FailedPrecondition,
        Unimplemented,
        Internal,
    )
}


def error_class(code: grpc.StatusCode) -> type[PlugboardError]:
    """The exception class for a status code (PlugboardError itself for codes without a subclass)."""
    return _BY_CODE.get(code, PlugboardError)


def from_rpc_error(err: grpc.RpcError) -> PlugboardError:
    """Convert a failed call (sync `grpc.RpcError`/`grpc.Call` or `grpc.aio.AioRpcError`) to our type.

    A bare `grpc.RpcError` that is not also a call (some interceptors raise those) becomes UNKNOWN.
    """
    code = _call(err, "code")
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details = _call(err, "details")
    debug = _call(err, "debug_error_string")
    return error_class(code)(
        details if isinstance(details, str) else (str(details) if details is not None else ""),
        code=code,
        retry_after=retry_after_seconds(_call(err, "trailing_metadata")),
        debug_error_string=debug if isinstance(debug, str) else None,
    )


def retry_after_seconds(metadata: Any) -> float | None:
    """Read `grpc-retry-pushback-ms` from trailing metadata as seconds.

    Accepts what either gRPC API returns: a sequence of (key, value) pairs or grpc.aio.Metadata.
    Missing, malformed or negative values (gRPC's "do not retry") give None.
    """
    if not metadata:
        return None
    for item in metadata:
        try:
            key, value = item
        except (TypeError, ValueError):
            continue
        if key != RETRY_PUSHBACK_KEY:
            continue
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        try:
            ms = int(str(value).strip())
        except ValueError:
            return None
        return ms / 1000.0 if ms >= 0 else None
    return None


def _call(err: object, name: str) -> Any:
    # Not every RpcError implements grpc.Call; treat a missing or failing accessor as "unknown".
    fn = getattr(err, name, None)
    if not callable(fn):
        return None
    try:
        return fn()
    except Exception:
        return None
