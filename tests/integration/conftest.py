"""An in-process server (own thread and event loop, free ports) on the tiny model, and clients for it."""

from __future__ import annotations

import pytest

from plugboard_client import Client
from tests.support.server import ServerThread, server_config


@pytest.fixture(scope="module")
def server(tiny_model):
    srv = ServerThread(server_config(max_batch_size=8), loader=lambda: tiny_model).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    with Client(server.target, timeout=30) as c:
        yield c
