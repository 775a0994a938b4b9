"""Bearer-token check for the admin RPCs (register, delete, alias, load, unload).

The Generation RPCs and the read-only Adapters RPCs need no token. Tokens are compared in constant
time and never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

ADMIN_METHODS = frozenset(
    f"/plugboard.v1.Adapters/{m}"
    for m in ("RegisterAdapter", "DeleteAdapter", "SetAlias", "LoadAdapter", "UnloadAdapter")
)


def read_token(path: Path) -> str:
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"the token file {path} is empty")
    return token


def _refusal(code: grpc.StatusCode, details: str, streaming_request: bool) -> grpc.RpcMethodHandler:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    async def stream(requests: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    if streaming_request:
        return grpc.stream_unary_rpc_method_handler(stream)
    return grpc.unary_unary_rpc_method_handler(unary)


class AdminAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method not in ADMIN_METHODS:
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization")
        streaming = details.method.endswith("/RegisterAdapter")
        if given is None:
            return _refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                "this call needs the admin token: 'authorization: Bearer <token>'",
                streaming,
            )
        if not hmac.compare_digest(str(given).encode(), self._expected):
            return _refusal(grpc.StatusCode.PERMISSION_DENIED, "the admin token is wrong", streaming)
        return await continuation(details)
