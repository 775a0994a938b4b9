"""Who may call: TLS server credentials (mutual TLS optional) and the bearer-token check.

Two tokens, each optional. The admin token guards the admin RPCs (register, delete, alias, load,
unload). The inference token guards every other plugboard.v1 RPC (Generation, and the read-only
Adapters RPCs: list, get); the admin token is accepted there too. With only an inference token set,
the admin RPCs need it as well: a server that asks for a token never leaves a plugboard RPC open.
Health checks and reflection never need a token (probes must work).

Tokens are compared in constant time, each given token against every accepted one, and are never
logged nor echoed in errors.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from plugboard_server.metrics import Metrics

log = logging.getLogger(__name__)

ADMIN_METHODS = frozenset(
    f"/plugboard.v1.Adapters/{m}"
    for m in ("RegisterAdapter", "DeleteAdapter", "SetAlias", "LoadAdapter", "UnloadAdapter")
)
PROTECTED_PREFIX = "/plugboard.v1."  # every plugboard RPC; grpc.health.v1 and reflection stay open


def read_token(path: Path) -> str:
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"the token file {path} is empty")
    return token


def server_credentials(
    cert: Path | None, key: Path | None, client_ca: Path | None = None
) -> grpc.ServerCredentials | None:
    """TLS with the PEM certificate chain `cert` and its `key` (None without them: plaintext); with
    `client_ca`, mutual TLS: clients must present a certificate signed by it."""
    if cert is None and key is None and client_ca is None:
        return None
    if cert is None or key is None:
        raise ValueError("TLS needs both a certificate and its key (a client CA alone is not enough)")
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca is not None else None,
        require_client_auth=client_ca is not None,
    )


def _bearer(token: str | None) -> bytes | None:
    return None if token is None else f"Bearer {token}".encode()


def _matches(given: bytes, accepted: list[bytes]) -> bool:
    ok = False
    for expected in accepted:  # no early exit: the time does not tell which token matched
        ok |= hmac.compare_digest(given, expected)
    return ok


def _refusal(
    handler: grpc.RpcMethodHandler,
    method: str,
    code: grpc.StatusCode,
    details: str,
    metrics: Metrics | None,
) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that refuses the call (the request is never parsed)."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        log.info("refused %s from %s: %s", method, context.peer(), code.name)
        if metrics is not None:  # counted like the calls that reach a servicer
            metrics.requests.labels(method.rsplit("/", 1)[-1], code.name).inc()
        await context.abort(code, details)

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(refuse)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks 'authorization: Bearer <token>' against the admin and the inference token (each optional)."""

    def __init__(
        self,
        *,
        admin_token: str | None = None,
        inference_token: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        admin, inference = _bearer(admin_token), _bearer(inference_token)
        self._metrics = metrics
        self._inference = inference
        # (tokens accepted, how to name them); no tokens: the call is open.
        self._admin_rpcs: tuple[list[bytes], str] = ([], "")
        self._other_rpcs: tuple[list[bytes], str] = ([], "")
        if admin is not None:
            self._admin_rpcs = ([admin], "the admin token")
        elif inference is not None:
            self._admin_rpcs = ([inference], "the inference token")
        if inference is not None:
            accepted = [inference] if admin is None else [inference, admin]
            self._other_rpcs = (accepted, "the inference token" + (" (or the admin token)" if admin else ""))

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or not method.startswith(PROTECTED_PREFIX):
            return handler
        admin_rpc = method in ADMIN_METHODS
        accepted, which = self._admin_rpcs if admin_rpc else self._other_rpcs
        if not accepted:
            return handler
        given = dict(details.invocation_metadata or ()).get("authorization")
        if given is None:
            return _refusal(
                handler,
                method,
                grpc.StatusCode.UNAUTHENTICATED,
                f"this call needs {which}: send metadata 'authorization: Bearer <token>'",
                self._metrics,
            )
        given_bytes = str(given).encode()
        if _matches(given_bytes, accepted):
            return handler
        if admin_rpc and self._inference is not None and _matches(given_bytes, [self._inference]):
            reason = "this call needs the admin token; the inference token is not enough"
        else:
            reason = f"the token is wrong: this call needs {which}"
        return _refusal(handler, method, grpc.StatusCode.PERMISSION_DENIED, reason, self._metrics)
