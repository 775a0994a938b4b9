"""Two replicas on one registry: how soon a module published through one is served by the other.

    python -m benchmarks.replicas --publishes 20

For each registry kind, a shared directory and an S3-compatible object store (moto's server on
127.0.0.1, so network and store latency are a loopback's; a real store adds its round trips), two
servers in this process each load the default model and share the registry:

- publish -> first served on the other replica: RegisterAdapter through replica A, then a 1-token
  Generate naming the new version on replica B, which has never seen it (B looks the version up,
  downloads it from an object store, checks it and loads it), p50 / p99, for a prefix and a LoRA;
- a 1-token request on B for a module already warm there, by name (which goes through B's copy of
  the registry's index), p50: what the registry costs per request once a module is known.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks.common import base_model_dir, percentile, serve
from plugboard_client import Client
from tests.support import peft_modules as pm
from tests.support.s3 import new_bucket, s3_server


@contextlib.contextmanager
def _registry(kind: str, work: Path) -> Iterator[dict]:
    """The server settings of a registry of `kind` ("directory" or "s3"), shared by both replicas."""
    if kind == "directory":
        yield {"registry": work / "registry"}
        return
    with s3_server() as endpoint:
        yield {"registry": f"s3://{new_bucket(endpoint)}/registry", "registry_endpoint_url": endpoint}


def _measure(kind: str, base_dir: Path, sources: dict[str, list[Path]], publishes: int, work: Path) -> dict:
    out: dict = {"publish_to_other_replica_ms": {}}
    with _registry(kind, work) as shared:
        caches = [{"registry_cache_dir": work / f"{kind}-cache-{i}"} for i in range(2)]
        with (
            serve(base_dir, **shared, **caches[0]) as a,
            serve(base_dir, **shared, **caches[1]) as b,
            Client(a.target, timeout=600) as ca,
            Client(b.target, timeout=600) as cb,
        ):
            for module, dirs in sources.items():
                latencies = []
                for i in range(publishes):
                    start = time.perf_counter()
                    info = ca.register_adapter(dirs[i % len(dirs)], name=f"{kind}-{module}")
                    r = cb.generate("Hello", adapter=info.ref, max_new_tokens=1)
                    latencies.append(time.perf_counter() - start)
                    assert r.adapter == info.ref, (r.adapter, info.ref)
                out["publish_to_other_replica_ms"][module] = {
                    "p50": statistics.median(latencies) * 1000,
                    "p99": percentile(latencies, 0.99) * 1000,
                }
            warm = []
            for _ in range(20):
                start = time.perf_counter()
                cb.generate("Hello", adapter=f"{kind}-lora", max_new_tokens=1)
                warm.append(time.perf_counter() - start)
            out["warm_request_ms"] = statistics.median(warm) * 1000
    return out


def run(model: str = "default", publishes: int = 20) -> dict:
    base_dir = base_model_dir(model)
    work = Path(tempfile.mkdtemp(prefix="plugboard-replicas-"))
    sources = {
        "prefix": [pm.prefix(base_dir, work / f"prefix-{i}", tokens=16, seed=i) for i in range(2)],
        "lora": [pm.lora(base_dir, work / f"lora-{i}", r=8, seed=i) for i in range(2)],
    }
    kinds = ("directory", "s3")
    return {
        "name": "two replicas, one registry",
        **{k: _measure(k, base_dir, sources, publishes, work) for k in kinds},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--publishes", type=int, default=20, help="publishes per module kind and registry")
    args = p.parse_args()
    r = run(args.model, args.publishes)
    for kind in ("directory", "s3"):
        for module, f in r[kind]["publish_to_other_replica_ms"].items():
            print(
                f"{kind:9} publish on A -> first served on B ({module}): "
                f"p50 {f['p50']:.0f} ms, p99 {f['p99']:.0f} ms"
            )
        print(f"{kind:9} 1-token request on B, module warm there: p50 {r[kind]['warm_request_ms']:.1f} ms")


if __name__ == "__main__":
    main()
