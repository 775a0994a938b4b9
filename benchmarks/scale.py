"""(e) 1,000 registered modules, 256 in play with Zipf popularity, 64 device slots, vs all resident.

    python -m benchmarks.scale --modules 1000 --in-play 256 --slots 64 --host 128 --concurrency 32

`modules` modules (prefix, soft prompt and LoRA in turn) are published straight into a fresh registry
directory through `LocalStore` before any server starts (the fastest path: no upload, no copy): each
is one of three PEFT-made templates with its own seeded noise added to every tensor, written with
safetensors into a staging directory, validated against the base model and published; the time is
reported. A fixed seed picks `in_play` of them and ranks their popularity (Zipf, weight 1 / rank^s,
s = 1.1) and draws the request sequence.

The same sequence is served, in a closed loop of `concurrency` clients, by two servers on the same
registry:
- constrained: `--max-loaded-adapters slots` (64) and `--max-host-adapters host` (128, the server's
  default: twice the device slots, as a deployment would size it to hold the popular modules, not
  every module in play; with 256 in play the host tier misses too, and those requests read from disk);
- all resident: slots and host tier >= in_play, every in-play module pinned with LoadAdapter first.
Both first serve the same warm-up (one 1-token request per in-play module, least popular first, then
`warmup` Zipf draws of another seed), so the constrained one starts in its steady state, not cold.
Both are up at once (each with its own copy of the model); the sequence is served in `rounds` chunks,
each chunk by one server then the other (alternating which goes first), so that a busy spell of a
shared machine falls on both. Every request generates exactly `new_tokens` tokens; throughput is
output tokens/s over all chunks, constrained / resident is the ratio (target >= 0.8). The cache hit
rates per tier, loads and evictions over the measured requests come from each server's own metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from benchmarks.common import CACHE, base_model_dir, make_modules, percentile, serve
from plugboard_client import AsyncClient
from plugboard_server.adapters.formats import read_spec
from plugboard_server.adapters.shape import model_shape
from plugboard_server.adapters.types import AdapterLimits
from plugboard_server.models.loading import LoadedModel, load_model
from plugboard_server.registry.local import LocalStore
from plugboard_server.registry.store import CONFIG_FILE, ModuleFacts
from tests.support.server import ServerThread

PROMPT = "Write a short story about a robot who learns to paint. Chapter {i}:"
WEIGHTS_FILE = "adapter_model.safetensors"
TARGET = 0.8
_TIMES = ("make_s", "publish_s")
PRESETS = {  # for benchmarks.bench: run(quick=True), run(smoke=True) (the smoke test's sizes)
    "quick": dict(requests=192, new_tokens=16, warmup=64, rounds=2),
    "smoke": dict(
        modules=40, in_play=16, slots=4, host=8, concurrency=8, requests=50, new_tokens=4, warmup=16
    ),
}
_METRICS = ("plugboard_adapter_", "plugboard_batch_size", "plugboard_step_duration_seconds")


def templates(base_dir: Path, cache: Path, virtual_tokens: int, lora_rank: int) -> list[tuple]:
    """One PEFT-made module of each kind (made once, kept in `cache`): (kind, config bytes, tensors)."""
    paths = make_modules(base_dir, cache / "scale" / base_dir.name, 3, tokens=virtual_tokens, rank=lora_rank)
    return [
        (p.name.split("-")[0], (p / CONFIG_FILE).read_bytes(), load_file(p / WEIGHTS_FILE)) for p in paths
    ]


def write_module(template: tuple[str, bytes, dict], out: Path, gen: torch.Generator) -> None:
    """The template's config, and its tensors each plus its own seeded noise (a module of its own)."""
    _, config, tensors = template
    (out / CONFIG_FILE).write_bytes(config)
    noisy = {k: v + 0.05 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in tensors.items()}
    save_file(noisy, str(out / WEIGHTS_FILE))


def publish_modules(
    loaded: LoadedModel, registry: Path, bases: list, count: int, *, limits: AdapterLimits, seed: int
) -> dict:
    """Publish `count` modules, `<kind>-NNNN`, the templates in turn with noise; -> names and timings."""
    shape = model_shape(loaded.model)
    gen = torch.Generator().manual_seed(seed)
    store = LocalStore(registry)
    names, make_s, publish_s = [], 0.0, 0.0
    try:
        for i in range(count):
            name = f"{bases[i % len(bases)][0]}-{i:04d}"
            start = time.perf_counter()
            with store.staging() as staged:
                write_module(bases[i % len(bases)], staged, gen)
                made = time.perf_counter()
                # What RegisterAdapter and --adapters-dir do: validate against the base model, publish.
                facts = ModuleFacts.from_spec(read_spec(staged, shape, limits), loaded.fingerprint)
                store.publish(name, staged, facts)
            make_s += made - start
            publish_s += time.perf_counter() - made
            names.append(name)
        size = sum(f.stat().st_size for f in (registry / "modules").rglob("*") if f.is_file())
    finally:
        store.close()
    return {"names": names, "make_s": make_s, "publish_s": publish_s, "bytes": size}


def zipf_workload(
    names: list[str], in_play: int, requests: int, exponent: float, seed: int
) -> tuple[list[str], list[str]]:
    """(the in-play modules, most popular first; `requests` draws from them), fixed by `seed`."""
    rng = random.Random(seed)
    hot = rng.sample(names, in_play)
    weights = [1.0 / (rank + 1) ** exponent for rank in range(in_play)]
    return hot, rng.choices(hot, weights, k=requests)


async def closed_loop(
    target: str, adapters: list[str], concurrency: int, new_tokens: int, first: int = 0
) -> dict:
    """`concurrency` clients each sending the next request of `adapters` when its last one returns."""
    todo = iter(enumerate(adapters, first))
    latencies: list[float] = []
    tokens = 0
    async with AsyncClient(target, timeout=1800) as c:

        async def client() -> None:
            nonlocal tokens
            for i, adapter in todo:  # shared: each request is sent once, in order
                start = time.perf_counter()
                r = await c.generate(
                    PROMPT.format(i=i), adapter=adapter, max_new_tokens=new_tokens, ignore_eos=True
                )
                latencies.append(time.perf_counter() - start)
                tokens += r.generated_tokens

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"elapsed_s": elapsed, "tokens": tokens, "latencies": latencies}


def metric_samples(server: ServerThread) -> dict[tuple[str, tuple], float]:
    """The module and batch metrics of the in-process server: (sample name, labels) -> value."""
    out = {}
    for family in server.server.metrics.registry.collect():
        if family.name.startswith(_METRICS):
            for s in family.samples:
                if not s.name.endswith("_created"):
                    out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _sum(delta: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in delta.items() if n == name and set(labels.items()) <= set(ls))


def explain(before: dict, after: dict) -> dict:
    """Hit rates per tier, loads, evictions, load times, mean batch and decode step between two snapshots."""
    d = {k: v - before.get(k, 0.0) for k, v in after.items()}
    out: dict = {"hit_rate": {}, "lookups": {}, "loads": {}, "load_ms": {}, "evictions": {}}
    for tier in ("device", "host"):
        hit = _sum(d, "plugboard_adapter_cache_total", tier=tier, result="hit")
        miss = _sum(d, "plugboard_adapter_cache_total", tier=tier, result="miss")
        out["hit_rate"][tier] = hit / (hit + miss) if hit + miss else float("nan")
        out["lookups"][tier] = int(hit + miss)
        out["evictions"][tier] = int(_sum(d, "plugboard_adapter_evictions_total", tier=tier))
    for tier in ("disk", "host"):  # disk: into host memory; host: into a device slot
        loads = _sum(d, "plugboard_adapter_load_seconds_count", tier=tier)
        out["loads"][tier] = int(_sum(d, "plugboard_adapter_loads_total", tier=tier, outcome="ok"))
        out["load_ms"][tier] = _sum(d, "plugboard_adapter_load_seconds_sum", tier=tier) / max(loads, 1) * 1000
    out["mean_batch"] = _sum(d, "plugboard_batch_size_sum") / max(_sum(d, "plugboard_batch_size_count"), 1)
    decode = max(_sum(d, "plugboard_step_duration_seconds_count", phase="decode"), 1)
    out["decode_step_ms"] = _sum(d, "plugboard_step_duration_seconds_sum", phase="decode") / decode * 1000
    out["prefills"] = int(_sum(d, "plugboard_step_duration_seconds_count", phase="prefill"))
    out["prefill_s"] = _sum(d, "plugboard_step_duration_seconds_sum", phase="prefill")
    return out


def _start(
    stack: ExitStack, loaded: LoadedModel, plan: dict, slots: int, host: int, *, pin: bool, **flags: object
) -> dict:
    """A server with these flags, every in-play module pinned if asked, warmed up."""
    server = stack.enter_context(serve(loaded, max_loaded_adapters=slots, max_host_adapters=host, **flags))

    async def pin_all() -> None:
        async with AsyncClient(server.target, timeout=600) as c:
            for name in plan["hot"]:
                await c.load_adapter(name)

    start = time.perf_counter()
    if pin:
        asyncio.run(pin_all())
    out = dict(slots=slots, host=host, pin_s=time.perf_counter() - start, server=server, elapsed_s=0.0)
    asyncio.run(closed_loop(server.target, plan["warm"], plan["concurrency"], 1))
    return {**out, "tokens": 0, "before": metric_samples(server)}


def _measure(servers: dict[str, dict], plan: dict, rounds: int) -> None:
    """The sequence in `rounds` chunks, each served by both servers in turn (alternating which first)."""
    n, lat = len(plan["sequence"]), {k: [] for k in servers}
    for r in range(rounds):
        lo, hi = r * n // rounds, (r + 1) * n // rounds
        for key in list(servers)[:: 1 if r % 2 == 0 else -1]:
            x = servers[key]
            args = (plan["sequence"][lo:hi], plan["concurrency"], plan["new_tokens"], lo)
            got = asyncio.run(closed_loop(x["server"].target, *args))
            x["elapsed_s"] += got["elapsed_s"]
            x["tokens"] += got["tokens"]
            x.setdefault("round_tokens_per_s", []).append(got["tokens"] / got["elapsed_s"])
            lat[key] += got["latencies"]
    for key, x in servers.items():
        x.update(explain(x.pop("before"), metric_samples(x.pop("server"))))
        x["tokens_per_s"] = x["tokens"] / x["elapsed_s"]
        x["latency_p50_s"], x["latency_p99_s"] = percentile(lat[key], 0.5), percentile(lat[key], 0.99)
        # A request retrying for a busy slot counts as another device miss; this is per request.
        x["slot_hit_per_request"] = max(0.0, 1 - x["loads"]["host"] / n)


def run(
    model: str = "default",
    modules: int = 1000,
    in_play: int = 256,
    slots: int = 64,
    host: int = 128,
    concurrency: int = 32,
    requests: int = 512,
    new_tokens: int = 32,
    warmup: int = 128,
    exponent: float = 1.1,
    seed: int = 0,
    virtual_tokens: int = 16,
    lora_rank: int = 8,
    rounds: int = 4,
    cache: Path = CACHE,
    quick: bool = False,
    smoke: bool = False,
) -> dict:
    """(e): throughput of the constrained server over that of the all-resident one, same request sequence.

    `quick` / `smoke`: the sizes of PRESETS instead of the ones given."""
    if quick or smoke:
        return run(model, cache=cache, **PRESETS["smoke" if smoke else "quick"])
    if not 0 < in_play <= modules:
        raise ValueError("need 0 < in_play <= modules")
    base_dir = base_model_dir(model)
    bases = templates(base_dir, cache, virtual_tokens, lora_rank)
    limits = AdapterLimits(max_lora_rank=lora_rank, max_prefix_tokens=max(virtual_tokens, 1))
    registry = Path(tempfile.mkdtemp(prefix="plugboard-scale-"))
    try:
        loaded = load_model(str(base_dir))
        made = publish_modules(loaded, registry, bases, modules, limits=limits, seed=seed)
        hot, sequence = zipf_workload(made["names"], in_play, requests, exponent, seed)
        rng = random.Random(seed + 1)
        weights = [1.0 / (r + 1) ** exponent for r in range(in_play)]
        warm = hot[::-1] + rng.choices(hot, weights, k=warmup)
        plan = dict(hot=hot, warm=warm, sequence=sequence, concurrency=concurrency, new_tokens=new_tokens)
        flags = dict(registry=registry, max_batch_size=concurrency, max_lora_rank=lora_rank)
        flags["max_prefix_tokens"] = limits.max_prefix_tokens
        sizes = {"constrained": (slots, host), "resident": (max(in_play, slots), max(in_play, host))}
        with ExitStack() as stack:  # both up at once, each with its own copy of the model
            servers: dict[str, dict] = {}
            for key, (n, h) in sizes.items():
                copy = loaded if not servers else load_model(str(base_dir))
                servers[key] = _start(stack, copy, plan, n, h, pin=key == "resident", **flags)
            _measure(servers, plan, rounds)
        constrained, resident = servers["constrained"], servers["resident"]
    finally:
        shutil.rmtree(registry, ignore_errors=True)
    top = set(hot[:slots])
    ratio = constrained["tokens_per_s"] / resident["tokens_per_s"]
    rates = zip(constrained["round_tokens_per_s"], resident["round_tokens_per_s"], strict=True)
    return {
        "name": f"(e) {modules} modules, Zipf({exponent}) over {in_play} in play, {slots} slots vs all",
        "register": {"modules": modules, "mib": made["bytes"] / 2**20, **{k: made[k] for k in _TIMES}},
        "workload": {
            "requests": requests,
            "concurrency": concurrency,
            "new_tokens": new_tokens,
            "distinct_modules": len(set(sequence)),
            "top_slots_share": sum(a in top for a in sequence) / len(sequence),
            "kinds": {k: sum(a.startswith(k) for a in sequence) for k in ("prefix", "prompt", "lora")},
        },
        "constrained": constrained,
        "resident": resident,
        "constrained_tokens_per_s": constrained["tokens_per_s"],
        "resident_tokens_per_s": resident["tokens_per_s"],
        "ratio": ratio,
        "round_ratios": [a / b for a, b in rates],
        "target": f">= {TARGET}",
        "holds": ratio >= TARGET,
    }


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def report(r: dict) -> str:
    reg, w, c, a = r["register"], r["workload"], r["constrained"], r["resident"]
    lines = [
        r["name"],
        f"registered {reg['modules']} modules ({reg['mib']:.0f} MiB) through LocalStore: "
        f"make {reg['make_s']:.1f} s + validate/publish {reg['publish_s']:.1f} s "
        f"({(reg['make_s'] + reg['publish_s']) / reg['modules'] * 1000:.1f} ms a module)",
        f"{w['requests']} requests x {w['new_tokens']} tokens, {w['concurrency']} clients (closed loop); "
        f"{w['distinct_modules']} distinct modules, {_pct(w['top_slots_share'])} of requests to the "
        f"{c['slots']} most popular; kinds {w['kinds']}",
        f"{'':<24}{'constrained':>14}{'all resident':>14}",
    ]
    rows = [
        ("device slots / host", lambda x: f"{x['slots']}/{x['host']}"),
        ("tokens/s", lambda x: f"{x['tokens_per_s']:.1f}"),
        ("elapsed s", lambda x: f"{x['elapsed_s']:.1f}"),
        ("latency p50 / p99 s", lambda x: f"{x['latency_p50_s']:.2f}/{x['latency_p99_s']:.2f}"),
        ("device hit rate", lambda x: _pct(x["hit_rate"]["device"])),
        ("device lookups", lambda x: f"{x['lookups']['device']}"),
        ("requests found a slot", lambda x: _pct(x["slot_hit_per_request"])),
        ("host hit rate", lambda x: _pct(x["hit_rate"]["host"])),
        ("disk->host loads", lambda x: f"{x['loads']['disk']} ({x['load_ms']['disk']:.1f} ms)"),
        ("host->slot loads", lambda x: f"{x['loads']['host']} ({x['load_ms']['host']:.1f} ms)"),
        ("evictions device/host", lambda x: f"{x['evictions']['device']}/{x['evictions']['host']}"),
        ("mean decode batch", lambda x: f"{x['mean_batch']:.1f}"),
        ("decode step ms", lambda x: f"{x['decode_step_ms']:.1f}"),
        ("prefills (s)", lambda x: f"{x['prefills']} ({x['prefill_s']:.1f})"),
    ]
    lines += [f"{label:<24}{f(c):>14}{f(a):>14}" for label, f in rows]
    verdict = "holds" if r["holds"] else "MISSED"
    rounds = ", ".join(f"{x:.3f}" for x in r["round_ratios"])
    lines.append(
        f"constrained / all resident = {r['ratio']:.3f} (target {r['target']}: {verdict}); rounds {rounds}"
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default', 'tiny' or a model directory")
    p.add_argument("--modules", type=int, default=1000, help="modules registered")
    p.add_argument("--in-play", type=int, default=256, help="modules requests are drawn from")
    p.add_argument("--slots", type=int, default=64, help="--max-loaded-adapters of the constrained server")
    p.add_argument("--host", type=int, default=128, help="--max-host-adapters of the constrained server")
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop clients")
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=128, help="Zipf warm-up requests after one per module")
    p.add_argument("--exponent", type=float, default=1.1, help="Zipf exponent")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--virtual-tokens", type=int, default=16, help="of each prefix and soft prompt")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4, help="chunks of the sequence, servers alternating")
    print(report(run(**vars(p.parse_args()))))


if __name__ == "__main__":
    main()
