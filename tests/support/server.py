"""Run a PlugboardServer on its own event loop in a background thread, on free ports.

Tests then talk to it over real sockets with the sync or the async client, from any thread or loop.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from plugboard_server.config import ServerConfig
from plugboard_server.main import PlugboardServer


class ServerThread:
    def __init__(self, config: ServerConfig, loader: Callable[[], Any] | None = None) -> None:
        self.server = PlugboardServer(config, loader=loader)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-server", daemon=True)

    def call(self, coro: Any, timeout: float | None = 60) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def submit(self, coro: Any) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def start(self, wait_ready: bool = True) -> ServerThread:
        self._thread.start()
        self.call(self.server.start())
        if wait_ready:
            self.call(self.server.ready())
        return self

    def stop(self, grace: float = 5.0) -> bool:
        drained = self.call(self.server.shutdown(grace))
        self.close()
        return drained

    def close(self) -> None:
        """End the server's loop and thread (after a shutdown)."""
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def server_config(**overrides: Any) -> ServerConfig:
    registry = Path(tempfile.mkdtemp(prefix="plugboard-registry-"))
    base = dict(model="unused", port=0, metrics_port=0, host="127.0.0.1", grace_period=5.0, registry=registry)
    return ServerConfig(**{**base, **overrides})
