"""Smoke runs of benchmarks (e) scale and (f) memory on the tiny model at small sizes: sane figures only.

The full-size runs (1,000 modules, 256 in play, 64 slots; 10,000 cycles, the default model) are
`python -m benchmarks.scale` and `python -m benchmarks.memory`; no timing is asserted here.
"""

from __future__ import annotations

import math

from benchmarks import memory, scale


def test_scale_smoke_reports_throughput_hit_rates_and_evictions(tiny_model_dir, tmp_path):
    r = scale.run(
        str(tiny_model_dir),
        modules=40,
        in_play=16,
        slots=4,
        host=8,
        concurrency=8,
        requests=50,
        new_tokens=4,
        warmup=16,
        rounds=2,
        cache=tmp_path,
    )
    print(scale.report(r))
    assert r["register"]["modules"] == 40 and r["register"]["publish_s"] > 0
    assert 0 < r["ratio"] < math.inf and r["holds"] == (r["ratio"] >= scale.TARGET)
    assert len(r["round_ratios"]) == 2 and all(0 < x < math.inf for x in r["round_ratios"])
    assert 1 < r["workload"]["distinct_modules"] <= 16
    assert sum(r["workload"]["kinds"].values()) == 50 and all(r["workload"]["kinds"].values())
    c, a = r["constrained"], r["resident"]
    for x in (c, a):
        assert x["tokens"] == 50 * 4 and x["tokens_per_s"] > 0
        assert 0 < x["latency_p50_s"] <= x["latency_p99_s"]
        for tier in ("device", "host"):
            assert 0 <= x["hit_rate"][tier] <= 1
        assert x["lookups"]["host"] == 50  # one host lookup a request
        assert 0 <= x["slot_hit_per_request"] <= 1
    assert (c["slots"], c["host"], a["slots"], a["host"]) == (4, 8, 16, 16)
    # 16 modules through 4 slots and 8 host entries: both tiers evict, and the disk is read.
    assert c["evictions"]["device"] > 0 and c["evictions"]["host"] > 0 and c["loads"]["disk"] > 0
    assert c["hit_rate"]["device"] < 1 and c["hit_rate"]["host"] < 1
    # Every in-play module pinned and warmed up: nothing moves during the measured requests.
    assert a["evictions"] == {"device": 0, "host": 0}
    assert a["loads"] == {"disk": 0, "host": 0}
    assert a["hit_rate"] == {"device": 1.0, "host": 1.0}


def test_memory_smoke_samples_rss_over_load_evict_cycles(tiny_model_dir, tmp_path):
    r = memory.run(
        str(tiny_model_dir),
        cycles=200,
        sample_every=50,
        generate_every=10,
        per_kind=1,
        slots=2,
        cache=tmp_path,
    )
    print(memory.report(r))
    assert [n for n, _ in r["rss_mib"]] == [50, 100, 150, 200]
    assert all(mib > 0 for _, mib in r["rss_mib"])
    assert r["generates"] == sum((i // 3) % 10 == 0 for i in range(200)) and r["cycles_per_s"] > 0
    assert 0 < r["ratio"] < math.inf and r["holds"] == (r["ratio"] < memory.TARGET)
    assert r["rss_last_mib"] == r["rss_mib"][-1][1] and r["rss_first_mib"] == r["rss_mib"][1][1]
