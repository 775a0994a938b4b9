"""Bytes that are not a valid protobuf message get INVALID_ARGUMENT, not grpc's bare UNKNOWN.

grpc parses each request with the handler's deserializer and answers UNKNOWN when it raises. This
interceptor gives every handler a deserializer that returns a marker instead, and refuses the call
when the marker reaches the handler (for a request stream: when the bad message comes up).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc


class _Malformed:
    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _lenient(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, or anything else the message class raises
            return _Malformed(str(exc) or type(exc).__name__)

    return parse


async def _check(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, _Malformed):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid protobuf message ({request.error})"
        )


async def _checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    async for request in requests:
        await _check(request, context)
        yield request


def _guard(behaviour: Callable[..., Any], streaming_request: bool) -> Callable[..., Any]:
    """The same kind of callable as `behaviour` (coroutine or async generator), checking its input."""

    async def prepare(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if streaming_request:
            return _checked(request, context)
        await _check(request, context)
        return request

    if inspect.isasyncgenfunction(behaviour):

        async def generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for item in behaviour(await prepare(request, context), context):
                yield item

        return generator

    async def coroutine(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await behaviour(await prepare(request, context), context)

    return coroutine


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        kind = next(
            k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, k)
        )
        guarded = _guard(getattr(handler, kind), streaming_request=kind.startswith("stream"))
        return handler._replace(
            request_deserializer=_lenient(handler.request_deserializer), **{kind: guarded}
        )
