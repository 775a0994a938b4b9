"""Routing by module: the header that lets a proxy send each module's calls to the replicas holding it warm.

A proxy in front of several plugboard replicas cannot read the protobuf body, so the clients name the
module in gRPC metadata as well: `x-plugboard-adapter: <module name>` on Generate, GenerateStream and
Score calls that apply a module, and on LoadAdapter / UnloadAdapter (so that a pin lands on the replica
the proxy will pick). Only the name is sent, never the version or alias ("sentiment@7" and
"sentiment@prod" both send "sentiment"): every version of a module then hashes to the same replicas,
and moving an alias keeps its warm replica. Base-model calls (adapter "") send no header, so a proxy
spreads them evenly. `deploy/envoy/envoy.yaml` hashes on this header.

A client generated from the .proto files should set the same header to benefit:
`metadata=[("x-plugboard-adapter", "sentiment")]` in Python, `-H 'x-plugboard-adapter: sentiment'` with
grpcurl. Without it the call still works; it just lands on any replica, which may have to load the
module first.
"""

from __future__ import annotations

from collections.abc import Sequence

ROUTING_HEADER = "x-plugboard-adapter"


def routing_key(adapter: str) -> str:
    """The module name that `adapter` ("name", "name@7", "name@alias") routes by; "" for the base model.

    A name gRPC could not carry as a metadata value (spaces, control or non-ASCII characters) gives "":
    such a name is malformed anyway, and the server's INVALID_ARGUMENT says so more clearly than the
    local metadata error that sending it would raise.
    """
    name = adapter.partition("@")[0]
    return name if all("!" <= c <= "~" for c in name) else ""


def routing_metadata(adapter: str) -> tuple[tuple[str, str], ...]:
    """The routing header for a call that applies `adapter`: `((ROUTING_HEADER, name),)`, or `()`."""
    key = routing_key(adapter)
    return ((ROUTING_HEADER, key),) if key else ()


def with_routing(metadata: Sequence[tuple[str, str]], adapter: str) -> tuple[tuple[str, str], ...]:
    """`metadata` plus the routing header for `adapter`; a module call's replaces any given in `metadata`.

    One value only: a proxy hashes a header sent twice on both values together (Envoy does), which
    points at no module's replicas.
    """
    route = routing_metadata(adapter)
    if not route:
        return tuple(metadata)
    return (*(item for item in metadata if item[0].lower() != ROUTING_HEADER), *route)
