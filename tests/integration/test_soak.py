"""A short soak: 16 clients over 8 modules of every kind for a minute while the registry churns.

Every answer must equal the same request served alone; the only error allowed is backpressure
(RESOURCE_EXHAUSTED, retried after the server's hint); memory must level off. The full-size run
(64 clients, 50 modules, 10 minutes, the default model) is `python -m benchmarks.soak`.
"""

from __future__ import annotations

import asyncio
import os

import psutil
import pytest

from benchmarks.common import make_modules
from benchmarks.soak import SoakConfig, soak
from tests.support.server import ServerThread, server_config

SECONDS = float(os.environ.get("PLUGBOARD_SOAK_SECONDS", "60"))


@pytest.mark.timeout(SECONDS + 240)
def test_a_short_soak_with_churn_serves_every_request_right(tiny_model, tiny_model_dir, tmp_path):
    modules = make_modules(tiny_model_dir, tmp_path / "modules", 8, tokens=4, rank=4)
    srv = ServerThread(
        server_config(max_batch_size=8, max_loaded_adapters=6, max_host_adapters=8, max_queued_requests=4),
        loader=lambda: tiny_model,
    ).start()
    me = psutil.Process()
    try:
        config = SoakConfig(clients=16, duration=SECONDS, churn_modules=3, retire_after=2.0)
        report = asyncio.run(
            soak(
                srv.target,
                modules,
                config,
                rss=lambda: me.memory_info().rss,
            )
        )
    finally:
        srv.stop()
    summary = report.summary()
    print(summary)
    assert report.wrong == 0, report.wrong_examples[:3]
    assert not report.errors, report.errors
    assert report.requests > 100 and report.refused > 0  # backpressure was exercised, and retried
    assert summary["churn"]["publishes"] > 5 and summary["churn"]["module_deletes"] > 1
    assert summary["churn"]["version_deletes"] > 1
    # The server, the clients and the test share this process: after the first quarter (caches and
    # slots filled) memory may wobble but must not keep growing.
    settled = [rss for t, rss in report.rss if t >= SECONDS / 4]
    assert settled[-1] <= settled[0] * 1.10 + (32 << 20), [r >> 20 for _, r in report.rss]
