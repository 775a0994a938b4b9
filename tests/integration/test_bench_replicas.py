"""Smoke run of benchmarks/replicas.py on the tiny model: both registry kinds, sane figures only.

The full run is `python -m benchmarks.replicas` on the default model; no timing is asserted here.
"""

from __future__ import annotations

import math

from benchmarks import replicas


def test_replicas_smoke_reports_publish_to_other_replica_for_both_registries(tiny_model_dir):
    r = replicas.run(str(tiny_model_dir), publishes=2)
    for kind in ("directory", "s3"):
        figures = r[kind]["publish_to_other_replica_ms"]
        assert set(figures) == {"prefix", "lora"}
        for f in figures.values():
            assert 0 < f["p50"] <= f["p99"] < math.inf
        assert 0 < r[kind]["warm_request_ms"] < math.inf
