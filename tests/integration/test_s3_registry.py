"""A server on an object-store registry: the Adapters RPCs, serving, and an outage of the store."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugboard_client import Client
from plugboard_client.errors import NotFound, Unavailable
from plugboard_server.models.loading import load_model
from tests.support import peft_modules as pm
from tests.support.s3 import new_bucket, s3_server
from tests.support.server import ServerThread, server_config

TOKEN = "s3-admin-token"
PROMPT = "Once upon a time"


def test_serving_from_an_object_store_and_through_its_outage(tiny_model_dir: Path, tmp_path: Path):
    """Modules already here keep serving while the store is down; what needs the store is UNAVAILABLE."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    lora = pm.lora(tiny_model_dir, tmp_path / "lora", r=4, seed=31)
    with s3_server() as endpoint:
        bucket = new_bucket(endpoint)
        srv = ServerThread(
            server_config(
                registry=f"s3://{bucket}/models",
                registry_endpoint_url=endpoint,
                registry_cache_dir=tmp_path / "cache",
                registry_refresh_s=0.0,  # every request re-reads the index: the outage shows at once
                admin_token_file=token_file,
            ),
            loader=lambda: load_model(str(tiny_model_dir)),
        ).start()
        try:
            with Client(srv.target, timeout=60, token=TOKEN) as c:
                c.register_adapter(lora, name="story", alias="prod")
                served = c.generate(PROMPT, adapter="story@prod", max_new_tokens=8, ignore_eos=True)
                assert served.adapter == "story@1"
                assert [a.name for a in c.list_adapters().adapters] == ["story"]
                with pytest.raises(NotFound):
                    c.generate(PROMPT, adapter="missing", max_new_tokens=2)
                cached = sorted(p.name for p in (tmp_path / "cache").rglob("versions/story/1/*"))
                assert cached == ["adapter_config.json", "adapter_model.safetensors"]
                size = sum(p.stat().st_size for p in lora.iterdir() if p.name in cached)
                assert _sample(srv, "plugboard_registry_downloads_total", outcome="ok") == 1
                assert _sample(srv, "plugboard_registry_download_bytes_total") == size
                c.unload_adapter("story@1")  # out of the device slot: the next request reads the cache
        except BaseException:
            srv.stop()
            raise
    # The store is gone now.
    try:
        with Client(srv.target, timeout=60, token=TOKEN) as c:
            again = c.generate(PROMPT, adapter="story@prod", max_new_tokens=8, ignore_eos=True)
            assert (again.text, again.adapter) == (served.text, served.adapter)
            with pytest.raises(Unavailable, match="object store"):
                c.generate(PROMPT, adapter="never-seen", max_new_tokens=2)
            with pytest.raises(Unavailable, match="object store"):
                c.register_adapter(lora, name="story")
            assert c.generate(PROMPT, max_new_tokens=2).text  # the base model does not need the store
            assert _sample(srv, "plugboard_registry_stale_reads_total") >= 1  # what an operator sees
    finally:
        srv.stop()


def _sample(srv: ServerThread, name: str, **labels: str) -> float | None:
    return srv.server.metrics.registry.get_sample_value(name, labels)
