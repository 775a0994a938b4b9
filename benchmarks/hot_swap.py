"""Hot swap and cache tiers on the embedded default model, through a real server and the client.

    python -m benchmarks.hot_swap --publishes 10 --cycles 1000

- publish -> first served request: RegisterAdapter of a new version, then a 1-token Generate naming
  the module (which must be served by the new version), p50 / p99, for a prefix and a LoRA;
- module load time from disk (read + checksum + validate), from the host tier (into a slot) and from
  the device tier (already in a slot), from the server's own histograms;
- RSS of the server after the first 100 and after `cycles` load / evict cycles (LoadAdapter,
  UnloadAdapter of alternating modules).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from plugboard_client import Client
from plugboard_server.models.default import provision
from plugboard_server.models.loading import load_model
from tests.support import peft_modules as pm
from tests.support.server import ServerThread, server_config


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def _histogram(server: ServerThread, tier: str) -> tuple[float, float]:
    count = total = 0.0
    for family in server.server.metrics.registry.collect():
        if family.name == "plugboard_adapter_load_seconds":
            for s in family.samples:
                if s.labels.get("tier") == tier and s.name.endswith("_count"):
                    count = s.value
                if s.labels.get("tier") == tier and s.name.endswith("_sum"):
                    total = s.value
    return count, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--publishes", type=int, default=10, help="publishes per kind")
    p.add_argument("--cycles", type=int, default=1000, help="load / evict cycles for the RSS figure")
    args = p.parse_args()
    base_dir = provision()
    work = Path(tempfile.mkdtemp(prefix="plugboard-hotswap-"))
    sources = {
        "prefix": [pm.prefix(base_dir, work / f"prefix-{i}", tokens=16, seed=i) for i in range(2)],
        "lora": [pm.lora(base_dir, work / f"lora-{i}", r=8, seed=i) for i in range(2)],
    }
    server = ServerThread(
        server_config(registry=work / "registry", max_loaded_adapters=4, metrics_port=-1),
        loader=lambda: load_model(str(base_dir)),
    ).start()
    rss = psutil.Process()
    try:
        with Client(server.target, timeout=600) as c:
            for kind, dirs in sources.items():
                latencies = []
                for i in range(args.publishes):
                    start = time.perf_counter()
                    info = c.register_adapter(dirs[i % 2], name=f"swap-{kind}")
                    r = c.generate("Hello", adapter=f"swap-{kind}", max_new_tokens=1)
                    latencies.append(time.perf_counter() - start)
                    assert r.adapter == info.ref, (r.adapter, info.ref)
                p50, p99 = statistics.median(latencies) * 1000, _percentile(latencies, 0.99) * 1000
                print(f"publish -> first served request ({kind}): p50 {p50:.0f} ms, p99 {p99:.0f} ms")
            for adapter in ("", "swap-prefix", "swap-lora"):  # the device tier: already in a slot
                times = []
                for _ in range(5):
                    start = time.perf_counter()
                    c.generate("Hello", adapter=adapter, max_new_tokens=1)
                    times.append(time.perf_counter() - start)
                print(
                    f"1-token request, module already in a device slot ({adapter or 'base model'}): "
                    f"{statistics.median(times) * 1000:.1f} ms"
                )
            for tier in ("disk", "host"):
                count, total = _histogram(server, tier)
                mean = total / max(count, 1) * 1000
                print(f"module load from {tier}: mean {mean:.1f} ms over {count:.0f} loads")
            names = ["swap-prefix", "swap-lora"]
            before = None
            for i in range(args.cycles):
                c.load_adapter(names[i % 2])
                c.unload_adapter(names[i % 2])
                if i + 1 == 100:
                    before = rss.memory_info().rss
            after = rss.memory_info().rss
            print(
                f"RSS after 100 load/evict cycles {before / 2**20:.1f} MiB, after {args.cycles}: "
                f"{after / 2**20:.1f} MiB (ratio {after / before:.3f})"
            )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
