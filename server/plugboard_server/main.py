"""Build everything and serve: gRPC (with health and reflection) and the Prometheus endpoint.

Start-up order: bind the ports and answer health checks (NOT_SERVING) at once, load the model in a
worker thread, warm it up, then report SERVING. On SIGTERM: report NOT_SERVING, refuse new requests,
let in-flight ones finish within the grace period, stop, exit 0.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import sys
import time
from collections.abc import Callable

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from plugboard.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc
from plugboard_server.config import ServerConfig
from plugboard_server.engine.engine import Engine
from plugboard_server.engine.types import GenerateInput, SamplingParams
from plugboard_server.errors import NotReady, PlugboardError
from plugboard_server.metrics import Metrics, serve_metrics
from plugboard_server.models.gguf import default_cache_dir
from plugboard_server.models.loading import LoadedModel, load_model
from plugboard_server.registry.importer import import_directory
from plugboard_server.registry.open import open_store
from plugboard_server.service.adapters import AdaptersServicer
from plugboard_server.service.auth import AuthInterceptor, read_token, server_credentials
from plugboard_server.service.generation import GenerationServicer
from plugboard_server.service.wire import MalformedRequestInterceptor

log = logging.getLogger("plugboard_server")

GENERATION = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
ADAPTERS = adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name


class PlugboardServer:
    """One server: tests run it in-process on free ports, `main` runs it as a process."""

    def __init__(self, config: ServerConfig, loader: Callable[[], LoadedModel] | None = None) -> None:
        """`loader` replaces loading `config.model` (tests hand in a tiny model, or a slow one)."""
        self.config = config
        self.metrics = Metrics(top_adapters=config.top_adapters)
        self.engine: Engine | None = None
        self._loader = loader or functools.partial(
            load_model,
            config.model,
            dtype=config.dtype,
            device=config.device,
            quantize=config.quantize,
            cache_dir=config.cache_dir,
        )
        self._health = health_aio.HealthServicer()
        self._grpc: grpc.aio.Server | None = None
        self._metrics_httpd = None
        self._startup: asyncio.Task[None] | None = None
        self.port = 0
        self.metrics_port = 0

    def _engine(self) -> Engine:
        if self.engine is None:
            raise NotReady("the model is still loading; retry shortly")
        return self.engine

    async def start(self) -> None:
        """Bind and serve at once; load the model in the background (see `ready`)."""
        cfg = self.config
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        interceptors: list[grpc.aio.ServerInterceptor] = [MalformedRequestInterceptor()]
        token_files = {"admin": cfg.admin_token_file, "inference": cfg.inference_token_file}
        tokens = {f"{kind}_token": read_token(path) for kind, path in token_files.items() if path is not None}
        if tokens:
            interceptors.append(AuthInterceptor(**tokens, metrics=self.metrics))
        self._grpc = grpc.aio.server(
            interceptors=interceptors,
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
            options=[
                ("grpc.max_concurrent_streams", cfg.max_concurrent_streams),
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
            ],
        )
        self.store = await asyncio.to_thread(
            open_store,
            cfg.registry,
            cache_root=cfg.registry_cache_dir or (cfg.cache_dir or default_cache_dir()) / "registry",
            endpoint_url=cfg.registry_endpoint_url,
            refresh_s=cfg.registry_refresh_s,
            cache_bytes=cfg.registry_cache_bytes,
            metrics=self.metrics,
        )
        generation_pb2_grpc.add_GenerationServicer_to_server(
            GenerationServicer(self._engine, self.store, self.metrics), self._grpc
        )
        adapters_pb2_grpc.add_AdaptersServicer_to_server(
            AdaptersServicer(self._engine, self.store, self.metrics, max_upload_bytes=cfg.max_upload_bytes),
            self._grpc,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        for service in ("", GENERATION, ADAPTERS):
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection(
            (
                GENERATION,
                ADAPTERS,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self._grpc,
        )
        try:
            credentials = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
            if credentials is not None:
                self.port = self._grpc.add_secure_port(f"{cfg.host}:{cfg.port}", credentials)
            else:
                self.port = self._grpc.add_insecure_port(f"{cfg.host}:{cfg.port}")
        except RuntimeError as exc:
            raise OSError(f"cannot bind the gRPC port {cfg.host}:{cfg.port}: {exc}") from exc
        if cfg.metrics_port >= 0:
            self._metrics_httpd = serve_metrics(self.metrics, cfg.metrics_host, cfg.metrics_port)
            self.metrics_port = self._metrics_httpd.server_address[1]
        await self._grpc.start()
        log.info(
            "gRPC on %s:%d, metrics on %s:%s; loading model %r",
            cfg.host,
            self.port,
            cfg.metrics_host,
            self.metrics_port if cfg.metrics_port >= 0 else "off",
            cfg.model,
        )
        log.info(
            "transport: %s; tokens: %s",
            "mutual TLS" if cfg.tls_client_ca else "TLS" if cfg.tls_cert else "plaintext (no TLS)",
            ", ".join(kind for kind, path in token_files.items() if path is not None) or "none",
        )
        self._startup = asyncio.create_task(self._load_and_warm(), name="plugboard-startup")

    async def ready(self) -> None:
        """Wait until the model is loaded and warm; raises what loading raised."""
        assert self._startup is not None, "start() first"
        await asyncio.shield(self._startup)

    async def _load_and_warm(self) -> None:
        loaded = await asyncio.to_thread(self._loader)
        engine = Engine(loaded, self.config.engine_config(), self.metrics, fetch=self.store.fetch)
        await engine.start()
        if self.config.adapters_dir is not None:
            published = await asyncio.to_thread(
                import_directory, self.store, self.config.adapters_dir, engine.describe_module
            )
            log.info("imported %d module versions from %s", len(published), self.config.adapters_dir)
        modules, versions = await asyncio.to_thread(self.store.count)
        self.metrics.registry_modules.set(modules)
        self.metrics.registry_versions.set(versions)
        start = time.perf_counter()
        await engine.generate(GenerateInput(prompt="Hello", params=SamplingParams(max_new_tokens=2)))
        log.info("warm-up generation took %.2fs", time.perf_counter() - start)
        self.engine = engine
        m = self.metrics
        m.model_load_seconds.set(loaded.load_seconds)
        info = engine.info()
        m.model.info(
            {
                "model": loaded.name,
                "fingerprint": info.fingerprint,
                "dtype": info.dtype,
                "device": info.device,
                "quantization": info.quantization,
            }
        )
        m.ready.set(1)
        for service in ("", GENERATION, ADAPTERS):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s (%s)", loaded.name, loaded.fingerprint)

    async def shutdown(self, grace: float | None = None) -> bool:
        """Drain: NOT_SERVING, refuse new work, finish in-flight work within `grace`. True if all finished."""
        grace = self.config.grace_period if grace is None else grace
        deadline = time.monotonic() + grace
        await self._health.enter_graceful_shutdown()
        self.metrics.ready.set(0)
        drained = True
        if self._startup is not None and not self._startup.done():
            self._startup.cancel()
        if self.engine is not None:
            self.engine.stop_accepting()
            log.info("draining: %d running, %d waiting", self.engine.running, self.engine.waiting)
            drained = await self.engine.wait_idle(grace)
        if self._grpc is not None:
            # In-flight handlers still have their last messages to send.
            await self._grpc.stop(max(1.0, deadline - time.monotonic()) if drained else 0)
        if self.engine is not None:
            await self.engine.stop()
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
        log.info("stopped (%s)", "drained" if drained else "grace period over; in-flight requests cut")
        return drained


async def serve(config: ServerConfig) -> int:
    server = PlugboardServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready = asyncio.ensure_future(server.ready())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done() and ready.exception() is not None:
        log.error("start-up failed: %s", ready.exception())
        await server.shutdown(0)
        return 1
    await stopping
    log.info("signal received; draining for up to %.0fs", config.grace_period)
    await server.shutdown()
    return 0


def main(argv: list[str] | None = None) -> None:
    config = ServerConfig.from_args(argv)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        sys.exit(asyncio.run(serve(config)))
    except (OSError, PlugboardError) as exc:  # a busy port, an unreachable or misconfigured registry
        log.error("%s", exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
