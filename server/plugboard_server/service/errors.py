"""The one place where domain errors become gRPC status codes, and where RPCs are counted and timed."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from plugboard_server.engine.engine import EngineFailure
from plugboard_server.errors import (
    AdapterNotFound,
    IncompatibleAdapter,
    InvalidRequest,
    ModelLoadError,
    NotReady,
    Overloaded,
    PlugboardError,
    RegistryUnavailable,
    StorageError,
    StorageFull,
)
from plugboard_server.metrics import Metrics
from plugboard_server.registry.store import AliasInUse

log = logging.getLogger(__name__)

# Most specific first: the first matching class wins.
_STATUS: tuple[tuple[type[PlugboardError], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterNotFound, grpc.StatusCode.NOT_FOUND),
    (IncompatibleAdapter, grpc.StatusCode.FAILED_PRECONDITION),
    (AliasInUse, grpc.StatusCode.FAILED_PRECONDITION),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StorageFull, grpc.StatusCode.RESOURCE_EXHAUSTED),  # no retry pushback: retrying needs space freed
    (StorageError, grpc.StatusCode.INTERNAL),
    (NotReady, grpc.StatusCode.UNAVAILABLE),
    (RegistryUnavailable, grpc.StatusCode.UNAVAILABLE),
    (ModelLoadError, grpc.StatusCode.UNAVAILABLE),
    (EngineFailure, grpc.StatusCode.INTERNAL),
)

# gRPC's own retry-pushback key: clients with a retry policy honour it; ours read it too.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


def status_for(exc: PlugboardError) -> tuple[grpc.StatusCode, tuple[tuple[str, str], ...]]:
    code = next((c for cls, c in _STATUS if isinstance(exc, cls)), grpc.StatusCode.INTERNAL)
    trailers: tuple[tuple[str, str], ...] = ()
    if isinstance(exc, Overloaded):
        trailers = ((RETRY_PUSHBACK_KEY, str(int(exc.retry_after * 1000))),)
    return code, trailers


def rpc(method: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a servicer method: map domain errors to status codes, count and time every call.

    Works for unary handlers and for async-generator (server-streaming) handlers alike. The servicer
    must have a `metrics` attribute.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(fn):

            @functools.wraps(fn)
            async def stream_handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
                outcome = _Outcome(self.metrics, method)
                try:
                    async for item in fn(self, request, context):
                        yield item
                except BaseException as exc:  # classified by fail(): aborted or re-raised
                    await outcome.fail(exc, context)
                finally:
                    outcome.record()

            return stream_handler

        @functools.wraps(fn)
        async def unary_handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            outcome = _Outcome(self.metrics, method)
            try:
                return await fn(self, request, context)
            except BaseException as exc:  # classified by fail(): aborted or re-raised
                await outcome.fail(exc, context)
            finally:
                outcome.record()

        return unary_handler

    return decorate


class _Outcome:
    def __init__(self, metrics: Metrics, method: str) -> None:
        self.metrics, self.method = metrics, method
        self.code = grpc.StatusCode.OK
        self.start = time.perf_counter()
        self._recorded = False

    async def fail(self, exc: BaseException, context: grpc.aio.ServicerContext) -> None:
        """Abort the RPC with the mapped status (raises), or re-raise what is not ours to map."""
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):  # the client went away
            self.code = grpc.StatusCode.CANCELLED
            raise exc
        if isinstance(exc, PlugboardError):
            self.code, trailers = status_for(exc)
            if trailers:
                context.set_trailing_metadata(trailers)
            self.record()  # before the status reaches the client, which may look at /metrics at once
            await context.abort(self.code, str(exc))
        if isinstance(exc, grpc.aio.AbortError) or _is_abort(exc):
            self.code = context.code() or grpc.StatusCode.UNKNOWN
            raise exc
        self.code = grpc.StatusCode.INTERNAL
        log.exception("%s failed unexpectedly", self.method, exc_info=exc)
        self.record()
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {self.method}")

    def record(self) -> None:
        if self._recorded:
            return
        self._recorded = True
        self.metrics.requests.labels(self.method, self.code.name).inc()
        self.metrics.request_duration.labels(self.method).observe(time.perf_counter() - self.start)


def _is_abort(exc: BaseException) -> bool:
    # grpc.aio raises AbortError from context.abort(); older versions raise a plain Exception subclass.
    return type(exc).__name__ == "AbortError"
