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

from benchmarks.common import base_model_dir, percentile, serve
from plugboard_client import Client
from tests.support import peft_modules as pm
from tests.support.server import ServerThread


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


def run(model: str = "default", publishes: int = 10, cycles: int = 1000) -> dict:
    base_dir = base_model_dir(model)
    work = Path(tempfile.mkdtemp(prefix="plugboard-hotswap-"))
    sources = {
        "prefix": [pm.prefix(base_dir, work / f"prefix-{i}", tokens=16, seed=i) for i in range(2)],
        "lora": [pm.lora(base_dir, work / f"lora-{i}", r=8, seed=i) for i in range(2)],
    }
    out: dict = {"name": "(d) hot swap", "publish_to_first_ms": {}, "device_tier_ms": {}, "load_ms": {}}
    rss = psutil.Process()
    with (
        serve(base_dir, registry=work / "registry", max_loaded_adapters=4) as server,
        Client(server.target, timeout=600) as c,
    ):
        for kind, dirs in sources.items():
            latencies = []
            for i in range(publishes):
                start = time.perf_counter()
                info = c.register_adapter(dirs[i % 2], name=f"swap-{kind}")
                r = c.generate("Hello", adapter=f"swap-{kind}", max_new_tokens=1)
                latencies.append(time.perf_counter() - start)
                assert r.adapter == info.ref, (r.adapter, info.ref)  # served by the new version
            out["publish_to_first_ms"][kind] = {
                "p50": statistics.median(latencies) * 1000,
                "p99": percentile(latencies, 0.99) * 1000,
            }
        for adapter in ("", "swap-prefix", "swap-lora"):  # the device tier: already in a slot
            times = []
            for _ in range(5):
                start = time.perf_counter()
                c.generate("Hello", adapter=adapter, max_new_tokens=1)
                times.append(time.perf_counter() - start)
            out["device_tier_ms"][adapter or "base"] = statistics.median(times) * 1000
        for tier in ("disk", "host"):
            count, total = _histogram(server, tier)
            out["load_ms"][tier] = {"mean": total / max(count, 1) * 1000, "loads": count}
        names = ["swap-prefix", "swap-lora"]
        before = after = 0
        for i in range(cycles):
            c.load_adapter(names[i % 2])
            c.unload_adapter(names[i % 2])
            if i + 1 == min(100, cycles):
                before = rss.memory_info().rss
        after = rss.memory_info().rss
    out["rss_mib"] = {"after_100": before / 2**20, f"after_{cycles}": after / 2**20}
    out["rss_ratio"] = after / before if before else float("nan")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--publishes", type=int, default=10, help="publishes per kind")
    p.add_argument("--cycles", type=int, default=1000, help="load / evict cycles for the RSS figure")
    args = p.parse_args()
    r = run(args.model, args.publishes, args.cycles)
    for kind, f in r["publish_to_first_ms"].items():
        print(f"publish -> first served request ({kind}): p50 {f['p50']:.0f} ms, p99 {f['p99']:.0f} ms")
    for adapter, ms in r["device_tier_ms"].items():
        print(f"1-token request, module already in a device slot ({adapter}): {ms:.1f} ms")
    for tier, f in r["load_ms"].items():
        print(f"module load from {tier}: mean {f['mean']:.1f} ms over {f['loads']:.0f} loads")
    rss = ", ".join(f"{k} {v:.1f} MiB" for k, v in r["rss_mib"].items())
    print(f"RSS {rss} (ratio {r['rss_ratio']:.3f})")


if __name__ == "__main__":
    main()
