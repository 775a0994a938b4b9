"""plugboard_client: the Python client (sync and asyncio) and `plugboard` CLI for the plugboard gRPC server.

    from plugboard_client import Client

    with Client("127.0.0.1:50051", timeout=30) as client:
        client.wait_ready()
        reply = client.generate(messages=[{"role": "user", "content": "Hi!"}], max_new_tokens=32)
        print(reply.text)

Responses are the protobuf messages of `plugboard.v1.generation_pb2` (and `adapters_pb2` for the
module registry methods: list_adapters, register_adapter, ...); failed calls raise the `PlugboardError`
subclasses exported here. The registry's admin methods need `Client(..., token=ADMIN_TOKEN)`; a server
started with --inference-token-file wants `token=` on every call. TLS: `Client(..., tls_ca="ca.pem")`,
plus `tls_cert=` and `tls_key=` for mutual TLS (`channel_credentials` builds the same credentials).
Calls that apply a module carry `ROUTING_HEADER` (`x-plugboard-adapter: <name>`) for routing by module
behind a proxy; `routing_metadata(adapter)` gives it to other gRPC clients (see `plugboard_client.routing`).
"""

from __future__ import annotations

from plugboard_client.aio import AsyncClient
from plugboard_client.client import DEFAULT_TARGET, Client
from plugboard_client.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PlugboardError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    from_rpc_error,
)
from plugboard_client.routing import ROUTING_HEADER, routing_metadata
from plugboard_client.tls import channel_credentials

__all__ = [
    "DEFAULT_TARGET",
    "ROUTING_HEADER",
    "AlreadyExists",
    "AsyncClient",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "PlugboardError",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "channel_credentials",
    "from_rpc_error",
    "routing_metadata",
]
