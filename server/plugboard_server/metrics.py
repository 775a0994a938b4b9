"""Every Prometheus metric plugboard exports, in one place, on a registry of its own.

A registry per server (not prometheus_client's global one) lets tests run several servers in one
process. Label sets are bounded: method names, status codes, finish reasons and step phases only.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)
_TOKEN_COUNT_BUCKETS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class ResidencyGauge:
    """1 per (module version, tier) it is resident in; a label set leaves when the module leaves the tier.

    Bounded by the cache sizes (device slots + host entries). A router reads it to send a module's
    requests to the replicas that hold it warm.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._gauge = Gauge(
            "plugboard_adapter_resident",
            "1 while the module version is resident in the tier (device or host)",
            ["adapter", "tier"],
            registry=registry,
        )
        self._present: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def set_resident(self, adapter: str, tier: str) -> None:
        with self._lock:
            self._gauge.labels(adapter, tier).set(1)
            self._present.add((adapter, tier))

    def remove_if_present(self, adapter: str, tier: str) -> None:
        with self._lock:
            if (adapter, tier) in self._present:
                self._present.discard((adapter, tier))
                self._gauge.remove(adapter, tier)


class ModuleLabels:
    """Bounded label values for per-module series: the first `limit` module names seen, then "other"."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._names: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, adapter: str) -> str:
        name = adapter.partition("@")[0] or "base"
        with self._lock:
            if name in self._names:
                return name
            if len(self._names) < self.limit:
                self._names.add(name)
                return name
        return "other"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, top_adapters: int = 20) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter(
            "plugboard_requests",
            "RPCs answered, by method and gRPC status code",
            ["method", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "plugboard_request_duration_seconds",
            "RPC latency",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "plugboard_queue_duration_seconds",
            "Time from submission to joining the batch",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "plugboard_time_to_first_token_seconds",
            "Time from submission to the first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "plugboard_time_per_output_token_seconds",
            "Mean time between a request's generated tokens after the first",
            buckets=_TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("plugboard_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("plugboard_generated_tokens", "Tokens generated", registry=r)
        self.request_prompt_tokens = Histogram(
            "plugboard_request_prompt_tokens",
            "Prompt tokens per request",
            buckets=_TOKEN_COUNT_BUCKETS,
            registry=r,
        )
        self.request_generated_tokens = Histogram(
            "plugboard_request_generated_tokens",
            "Generated tokens per request",
            buckets=_TOKEN_COUNT_BUCKETS,
            registry=r,
        )
        self.finished = Counter(
            "plugboard_finished_requests", "Generations ended, by finish reason", ["reason"], registry=r
        )
        self.batch_size = Histogram(
            "plugboard_batch_size", "Rows in each decode step", buckets=_BATCH_BUCKETS, registry=r
        )
        self.step_duration = Histogram(
            "plugboard_step_duration_seconds",
            "Duration of one model forward, by phase (prefill, decode, score)",
            ["phase"],
            buckets=(*_TOKEN_LATENCY_BUCKETS, 5, 10, 30),
            registry=r,
        )
        self.running_requests = Gauge(
            "plugboard_running_requests", "Requests in the running batch", registry=r
        )
        self.waiting_requests = Gauge(
            "plugboard_waiting_requests", "Requests waiting to join the batch", registry=r
        )
        self.ready = Gauge("plugboard_ready", "1 when the model is loaded and serving, else 0", registry=r)
        self.model_load_seconds = Gauge(
            "plugboard_model_load_seconds", "Time taken to load the model", registry=r
        )
        self.model = Info("plugboard_model", "The base model being served", registry=r)
        # ----- modules and the registry
        self.adapter_loads = Counter(
            "plugboard_adapter_loads",
            "Module loads into a tier (disk -> host memory, host -> device slot), by outcome: ok, error; "
            "from disk also corrupt (files differ from the registry's checksums) and deleted (meanwhile)",
            ["tier", "outcome"],
            registry=r,
        )
        self.adapter_load_seconds = Histogram(
            "plugboard_adapter_load_seconds",
            "Time to load a module from a tier (disk: read + checksum + validate; host: into a slot)",
            ["tier"],
            buckets=(*_TOKEN_LATENCY_BUCKETS, 5, 10, 30),
            registry=r,
        )
        self.adapter_cache = Counter(
            "plugboard_adapter_cache",
            "Module cache lookups by tier and result (hit, miss)",
            ["tier", "result"],
            registry=r,
        )
        self.adapter_evictions = Counter(
            "plugboard_adapter_evictions", "Modules evicted from a tier", ["tier"], registry=r
        )
        self.adapters_resident = Gauge(
            "plugboard_adapters_resident", "Modules resident per tier", ["tier"], registry=r
        )
        self.adapter_resident = ResidencyGauge(r)
        self.registry_modules = Gauge("plugboard_registry_modules", "Modules in the registry", registry=r)
        self.registry_versions = Gauge(
            "plugboard_registry_versions", "Module versions in the registry", registry=r
        )
        # ----- an object-store registry (--registry s3://...)
        self.registry_downloads = Counter(
            "plugboard_registry_downloads",
            "Module versions downloaded from an object-store registry into the local cache, by outcome: "
            "ok, corrupt (differs from its checksums), deleted (meanwhile), error",
            ["outcome"],
            registry=r,
        )
        self.registry_download_bytes = Counter(
            "plugboard_registry_download_bytes", "Bytes downloaded from an object-store registry", registry=r
        )
        self.registry_download_seconds = Histogram(
            "plugboard_registry_download_seconds",
            "Time to download a module version from an object-store registry (and check it)",
            buckets=(*_TOKEN_LATENCY_BUCKETS, 5, 10, 30, 60),
            registry=r,
        )
        self.registry_stale_reads = Counter(
            "plugboard_registry_stale_reads",
            "Lookups answered from an old copy of a module's index because the object store could not "
            "be reached (serving goes on; publishing and unseen modules fail)",
            registry=r,
        )
        self.module_label = ModuleLabels(top_adapters)
        self.adapter_requests = Counter(
            "plugboard_adapter_requests",
            'Finished generations per module ("base" = none; "other" past the first N names)',
            ["adapter"],
            registry=r,
        )
        self.adapter_generated_tokens = Counter(
            "plugboard_adapter_generated_tokens",
            'Tokens generated per module ("base" = none; "other" past the first N names)',
            ["adapter"],
            registry=r,
        )


def serve_metrics(metrics: Metrics, host: str, port: int) -> WSGIServer:
    """Serve /metrics over HTTP on a daemon thread; port 0 picks a free port (see server_address)."""
    httpd, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return httpd
