"""Envoy with deploy/envoy/envoy.yaml in front of three replicas on one registry: routing by module.

Only the addresses of the shipped file change. Each module's calls reach one replica (whatever the
ref form, and for a raw stub that sets the header by hand), base-model calls spread, and when a
replica leaves only its modules move.
"""

from __future__ import annotations

import copy
import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import yaml

from plugboard.v1 import generation_pb2, generation_pb2_grpc
from plugboard_client import Client, routing_metadata
from tests.support.envoy import envoy_binary, find_cluster, find_listener, load_config

# End to end: Envoy with this file (only the addresses changed) in front of three replicas.

MODULES = [f"mod-{i}" for i in range(9)]


def _local_config(config: dict[str, Any], ports: list[int]) -> dict[str, Any]:
    """The shipped file, pointed at replicas on 127.0.0.1:`ports`; Envoy's own ports free; faster checks."""
    local = copy.deepcopy(config)
    local["admin"]["address"]["socket_address"]["port_value"] = 0
    resources = local["static_resources"]
    resources["listeners"] = [find_listener(local, "plugboard_grpc")]
    resources["listeners"][0]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": 0}
    cluster = find_cluster(local, "plugboard")
    resources["clusters"] = [cluster]
    cluster["type"] = "STATIC"
    del cluster["dns_lookup_family"]
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
        for p in ports
    ]
    cluster["health_checks"][0].update(interval="0.2s", no_traffic_interval="0.2s")
    return local


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def _wait(condition: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Fleet:
    """Three replicas on one registry, and Envoy in front of them."""

    def __init__(self, replicas: list[Any], envoy: subprocess.Popen[bytes], admin: str, target: str) -> None:
        self.replicas, self.envoy, self.admin, self.target = replicas, envoy, admin, target
        self.stopped: set[int] = set()

    def ok_counts(self) -> list[float]:
        sample = {"method": "Generate", "code": "OK"}
        registries = [r.server.metrics.registry for r in self.replicas]
        return [reg.get_sample_value("plugboard_requests_total", sample) or 0.0 for reg in registries]

    def served_by(self, client: Client, adapter: str) -> int:
        """The replica that answered one Generate call for `adapter`."""
        before = self.ok_counts()
        client.generate("Hi", adapter=adapter, max_new_tokens=1)
        changed = [i for i, (b, a) in enumerate(zip(before, self.ok_counts(), strict=True)) if a != b]
        assert len(changed) == 1, changed
        return changed[0]

    def resident_on(self, ref: str) -> set[int]:
        """The replicas whose plugboard_adapter_resident gauge shows `ref` warm, in either tier."""
        out = set()
        for i, replica in enumerate(self.replicas):
            registry = replica.server.metrics.registry
            tiers = ("device", "host")
            samples = [
                registry.get_sample_value("plugboard_adapter_resident", {"adapter": ref, "tier": t})
                for t in tiers
            ]
            if any(samples):
                out.add(i)
        return out

    def healthy_hosts(self) -> int:
        return _get(f"http://{self.admin}/clusters").count("::health_flags::healthy")


@pytest.fixture(scope="module")
def fleet(tiny_model_dir, tmp_path_factory) -> Iterator[Fleet]:
    from plugboard_server.models.loading import load_model
    from tests.support import peft_modules as pm
    from tests.support.server import ServerThread, server_config

    envoy_bin = envoy_binary()
    root = tmp_path_factory.mktemp("fleet")
    for i, name in enumerate(MODULES):
        pm.prefix(tiny_model_dir, root / "modules" / name, tokens=2, seed=i)
    replicas: list[Any] = []
    for i in range(3):
        # The first replica imports the modules into the shared registry; the others just serve it.
        extra = {"adapters_dir": root / "modules"} if i == 0 else {}
        cfg = server_config(registry=root / "registry", max_loaded_adapters=4, **extra)
        replicas.append(ServerThread(cfg, loader=lambda: load_model(str(tiny_model_dir))).start())
    config_file = root / "envoy.yaml"
    config_file.write_text(yaml.safe_dump(_local_config(load_config(), [r.server.port for r in replicas])))
    admin_file = root / "admin-address"
    log = (root / "envoy.log").open("wb")
    envoy = subprocess.Popen(
        [
            envoy_bin,
            "-c",
            str(config_file),
            "--admin-address-path",
            str(admin_file),
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "--log-level",
            "warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    fleet = None
    try:
        admin = _wait(lambda: admin_file.exists() and admin_file.read_text().strip(), "Envoy's admin address")
        listeners = _wait(lambda: json.loads(_get(f"http://{admin}/listeners?format=json")), "the listener")
        port = listeners["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
        fleet = Fleet(replicas, envoy, admin, f"127.0.0.1:{port}")
        _wait(lambda: fleet.healthy_hosts() == 3, "three healthy replicas in Envoy")
        yield fleet
    finally:
        envoy.terminate()
        try:
            envoy.wait(10)
        except subprocess.TimeoutExpired:
            envoy.kill()
            envoy.wait()
        log.close()
        for i, replica in enumerate(replicas):
            if fleet is None or i not in fleet.stopped:
                replica.stop()


@pytest.mark.e2e
def test_each_module_stays_on_one_replica_and_base_calls_spread(fleet: Fleet) -> None:
    with Client(fleet.target, timeout=60) as c:
        owners = {name: fleet.served_by(c, name) for name in MODULES}
        for name in MODULES:
            # Every version and alias of the module goes where its name goes.
            for ref in (name, f"{name}@1", f"{name}@latest", name):
                assert fleet.served_by(c, ref) == owners[name], ref
            # ... and only that replica loaded it.
            assert fleet.resident_on(f"{name}@1") == {owners[name]}, name
        base = [fleet.served_by(c, "") for _ in range(24)]
    assert len(set(base)) >= 2, base  # all 24 on one replica by chance: p = 3 * (1/3)**24
    # Any gRPC client that sets the header is routed the same way.
    with grpc.insecure_channel(fleet.target) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        request = generation_pb2.GenerateRequest(
            adapter=f"{MODULES[0]}@1", prompt="Hi", params=generation_pb2.GenerationParams(max_new_tokens=1)
        )
        before = fleet.ok_counts()
        stub.Generate(request, metadata=routing_metadata(request.adapter), timeout=60)
        after = fleet.ok_counts()
    assert [a - b for a, b in zip(after, before, strict=True)].index(1.0) == owners[MODULES[0]]
    stats = _get(f"http://{fleet.admin}/stats/prometheus")
    assert 'envoy_cluster_upstream_rq_total{envoy_cluster_name="plugboard"}' in stats


@pytest.mark.e2e
def test_when_a_replica_leaves_only_its_modules_move(fleet: Fleet) -> None:
    with Client(fleet.target, timeout=60) as c:
        owners = {name: fleet.served_by(c, name) for name in MODULES}
        gone = owners[MODULES[0]]
        replica = fleet.replicas[gone]
        # What SIGTERM does first (PlugboardServer.shutdown): health NOT_SERVING, new calls refused
        # with UNAVAILABLE, so Envoy retries them elsewhere until its health checks drop the replica.
        replica.call(replica.server._health.enter_graceful_shutdown())
        replica.server.engine.stop_accepting()
        draining = {name: fleet.served_by(c, name) for name in MODULES}
        _wait(lambda: fleet.healthy_hosts() == 2, "Envoy to drop the draining replica")
        dropped = {name: fleet.served_by(c, name) for name in MODULES}
        replica.stop()  # the rest of the drain; then the port closes
        fleet.stopped.add(gone)
        exited = {name: fleet.served_by(c, name) for name in MODULES}
    for name in MODULES:
        if owners[name] == gone:
            assert gone not in (draining[name], dropped[name], exited[name]), name
            assert dropped[name] == exited[name], name  # its new home, for good
        else:
            assert draining[name] == dropped[name] == exited[name] == owners[name], name
