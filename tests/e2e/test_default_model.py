"""The real embedded default model (SmolLM2-135M-Instruct): `pytest -m default_model` selects these."""

from __future__ import annotations

import pytest

from plugboard_client import Client
from tests.support.server import ServerThread, server_config

pytestmark = pytest.mark.default_model


@pytest.fixture(scope="module")
def default_server():
    # Converts the embedded GGUF on first use (~20 s), then loads from the cache.
    srv = ServerThread(server_config(model="default")).start()
    yield srv
    srv.stop()


def test_the_capital_of_france_is_paris(default_server):
    with Client(default_server.target, timeout=120) as c:
        r = c.generate(
            messages=[{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=32
        )
        info = c.model_info()
    assert "Paris" in r.text
    assert info.name == "SmolLM2-135M-Instruct"
    assert (info.num_layers, info.num_attention_heads, info.num_key_value_heads) == (30, 9, 3)
