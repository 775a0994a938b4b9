"""Load generator: closed- or open-loop load over a workload of modules, each request measured as it streams.

    python -m benchmarks.loadgen --model tiny --mode closed --concurrency 8 --duration 10 --modules 6
    python -m benchmarks.loadgen --target HOST:PORT --mode open --rate 5 --duration 60 --modules 32 \\
        --mix prefix=1,prompt=1,lora=1,base=0 --popularity zipf:1.1 --prompt-len 64 \\
        --output-len uniform:16:128 --json out.json

Closed loop: `concurrency` workers, each sending its next request when its previous one ends, until
`duration` seconds have passed (no request starts later; those in flight finish) or `requests` have
been sent, whichever comes first. Open loop: requests arrive as a Poisson process of `rate` per second
for `duration` seconds and are sent on arrival however many are in flight. The number in flight at
each arrival is recorded, with when it first exceeded the server's batch size (requests queue there)
and how late the generator itself sent an arrival (beyond a few ms, the client is the bottleneck).

Each request streams (GenerateStream), greedy, `ignore_eos` with `max_new_tokens` = the drawn output
length. Measured on the client: TTFT (sent -> first message carrying tokens), TPOT ((last message -
first token) / (tokens - 1), requests of 2+ tokens), latency (sent -> last message), tokens, status:
"OK", a gRPC status name (not retried, RESOURCE_EXHAUSTED included), an exception's class name, or
`finish:REASON` when the stream ended otherwise than by LENGTH. Before the measurement each module
and the base model serve one 1-token request, unless `warmup=False`. Throughput counts successes over
the whole run, the in-flight tail included.

Modules: `prepare()` makes them (common.make_modules) and registers them on a running server, or
`workload_modules()` makes them for a server's --adapters-dir, as --model does (that server shares this
process's GIL with the client: compare its figures with each other; use --target for absolute ones).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from benchmarks.common import CACHE, base_model_dir, make_modules, serve
from benchmarks.workload import FILLER, LoadReport, RequestRecord, RequestSpec, Sampler, Workload
from plugboard.v1 import generation_pb2 as pb
from plugboard_client import AsyncClient, NotFound, PlugboardError
from plugboard_client.adapters import adapter_files


async def calibrate(client: AsyncClient) -> tuple[list[int], int]:
    """(tokens of " " + each FILLER word, tokens added to every prompt) for the server's tokenizer."""
    one, two = [len((await client.tokenize(" the" * n)).token_ids) for n in (1, 2)]
    overhead = max(0, 2 * one - two)
    tokens = list((await client.tokenize("".join(" " + w for w in FILLER))).tokens)[overhead:]
    costs: list[int] = []
    for text in tokens:  # a word's tokens: from one starting with a space to the next
        if text.startswith(" ") or not costs:
            costs.append(0)
        costs[-1] += 1
    if len(costs) != len(FILLER):  # not split at spaces: the mean cost for every word
        costs = [max(1, round(len(tokens) / len(FILLER)))] * len(FILLER)
    return costs, overhead


def workload_modules(workload: Workload, base_dir: Path, modules_dir: Path | None = None) -> list[Path]:
    """The workload's module directories, made (or found cached) in `modules_dir`; by default a directory
    holding only these, fit to be a server's --adapters-dir (module names = directory names)."""
    kinds, w, base_dir = workload.kinds(), workload, Path(base_dir)
    if modules_dir is None:
        n = Counter(kinds)
        key = f"{n['prefix']}f{n['prompt']}p{n['lora']}l-t{w.virtual_tokens}-r{w.lora_rank}-s{w.seed}"
        modules_dir = _cache(base_dir, key)
    made = dict(tokens=w.virtual_tokens, rank=w.lora_rank, kinds=kinds or ("prefix",), seed=w.seed)
    return make_modules(base_dir, modules_dir, len(kinds), **made)


def _cache(base_dir: Path, key: str) -> Path:
    """A cache directory of modules for the base model in `base_dir` (by name and place)."""
    place = hashlib.sha256(str(Path(base_dir).resolve()).encode()).hexdigest()[:8]
    return CACHE / "loadgen" / f"{Path(base_dir).name}-{place}-{key}"


async def prepare(
    target: str,
    workload: Workload,
    base_dir: Path,
    modules_dir: Path | None = None,
    *,
    token: str | None = None,
    timeout: float = 300.0,
) -> list[str]:
    """Make the workload's modules (in `modules_dir`, by default a cache shared by every workload) and
    register each on `target` named after its directory, unless that name's latest version has the same
    files. Returns the names, module i's first."""
    base_dir = Path(base_dir)
    paths = workload_modules(workload, base_dir, modules_dir or _cache(base_dir, "pool"))
    async with AsyncClient(target, timeout=timeout, token=token) as client:
        await client.wait_ready(timeout)
        for path in paths:
            try:
                info = await client.get_adapter(path.name)
                if dict(info.sha256) == {p.name: sha for p, _, sha in adapter_files(path)}:
                    continue
            except NotFound:
                pass
            await client.register_adapter(path, name=path.name)
    return [p.name for p in paths]


async def _send(client: AsyncClient, spec: RequestSpec, t0: float, timeout: float, out: list) -> None:
    record = RequestRecord(spec, time.perf_counter() - t0)
    first = final = None
    sent = time.perf_counter()
    try:
        stream = client.generate_stream(
            spec.prompt,
            adapter=spec.adapter,
            max_new_tokens=spec.output_tokens,
            ignore_eos=True,
            timeout=timeout,
        )
        async with contextlib.aclosing(stream):
            async for message in stream:
                if first is None and (message.token_ids or message.text):
                    first = time.perf_counter()
                if message.finish_reason:
                    final = message
    except PlugboardError as exc:
        record.status = exc.code.name
    except Exception as exc:  # a load generator counts every failure and goes on
        record.status = type(exc).__name__
    end = time.perf_counter()
    if record.status == "OK":
        if final is None or final.finish_reason != pb.LENGTH:
            record.status = f"finish:{pb.FinishReason.Name(final.finish_reason) if final else 'NONE'}"
        record.tokens, record.prompt_tokens = (
            (final.generated_tokens, final.prompt_tokens) if final else (0, 0)
        )
        first = end if first is None else first
        record.ttft, record.latency = first - sent, end - sent
        record.tpot = (end - first) / (record.tokens - 1) if record.tokens > 1 else None
    out.append(record)


async def _closed(clients: list[AsyncClient], sampler: Sampler, report: LoadReport, **kw: Any) -> None:
    t0 = kw["t0"]
    stop_at = t0 + kw["duration"] if kw["duration"] is not None else math.inf
    limit = kw["requests"] if kw["requests"] is not None else math.inf

    async def worker(i: int) -> None:
        while time.perf_counter() < stop_at and sampler.drawn < limit:
            await _send(clients[i % len(clients)], sampler.draw(), t0, kw["timeout"], report.records)

    await asyncio.gather(*(worker(i) for i in range(kw["concurrency"])))


async def _open(clients: list[AsyncClient], sampler: Sampler, report: LoadReport, **kw: Any) -> None:
    rng = random.Random(f"arrivals-{sampler.workload.seed}")
    tasks: set[asyncio.Task] = set()
    at = t0 = kw["t0"]
    while (at := at + rng.expovariate(kw["rate"])) < t0 + kw["duration"]:
        if at > time.perf_counter():
            await asyncio.sleep(at - time.perf_counter())
        report.max_lag = max(report.max_lag, time.perf_counter() - at)
        client = clients[sampler.drawn % len(clients)]
        task = asyncio.create_task(_send(client, sampler.draw(), t0, kw["timeout"], report.records))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        report.in_flight.append((at - t0, len(tasks)))
    await asyncio.gather(*list(tasks))


async def run_load(
    target: str,
    workload: Workload,
    names: list[str],
    *,
    mode: str = "closed",
    concurrency: int = 8,
    duration: float | None = 30.0,
    requests: int | None = None,
    rate: float | None = None,
    warmup: bool = True,
    connections: int = 4,
    timeout: float = 300.0,
    token: str | None = None,
    calibrate_prompts: bool = True,
) -> LoadReport:
    """One run: `names[i]` serves the workload's module i (from `prepare` or `workload_modules`).
    Closed: `concurrency` workers until `duration` s or `requests` requests (the first reached; give one).
    Open: Poisson arrivals at `rate`/s for `duration` s. `connections` channels share the requests."""
    if mode == "closed" and (concurrency < 1 or (duration is None and requests is None)):
        raise ValueError("closed loop: concurrency >= 1 and a duration or a number of requests")
    if mode == "open" and not (rate and rate > 0 and duration and duration > 0):
        raise ValueError("open loop: rate > 0 and duration > 0")
    if mode not in ("closed", "open"):
        raise ValueError(f"mode {mode!r}: 'closed' or 'open'")
    options = [("grpc.use_local_subchannel_pool", 1)]  # one connection per client, not one shared
    clients = [AsyncClient(target, timeout=timeout, token=token, options=options) for _ in range(connections)]
    try:
        await clients[0].wait_ready(timeout)
        info = await clients[0].model_info()
        report = LoadReport(mode, workload.describe(), concurrency if mode == "closed" else None, rate)
        report.server = dict(
            model=info.name or info.model, device=info.device, max_batch_size=info.max_batch_size
        )
        sampler = workload.sampler(names, *(await calibrate(clients[0]) if calibrate_prompts else ()))
        if warmup:
            await _warmup(clients, names, timeout)
        t0 = time.perf_counter()
        limits = dict(concurrency=concurrency, duration=duration, requests=requests, rate=rate)
        await (_closed if mode == "closed" else _open)(
            clients, sampler, report, t0=t0, timeout=timeout, **limits
        )
        report.seconds = time.perf_counter() - t0
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    report.records.sort(key=lambda r: r.spec.seq)
    return report


async def _warmup(clients: list[AsyncClient], names: list[str], timeout: float) -> None:
    """One 1-token request on the base model and on each module, a few at a time (loads every module)."""
    gate = asyncio.Semaphore(8)

    async def one(i: int, adapter: str) -> None:
        async with gate:
            await clients[i % len(clients)].generate(
                "warm up", adapter=adapter, max_new_tokens=1, timeout=timeout
            )

    await asyncio.gather(*(one(i, a) for i, a in enumerate(["", *names])))


def run(target: str, workload: Workload, names: list[str], **kwargs: Any) -> LoadReport:
    """`run_load` from synchronous code (not inside a running event loop)."""
    return asyncio.run(run_load(target, workload, names, **kwargs))


def sweep_load(
    target: str,
    workload: Workload,
    names: list[str],
    concurrencies: tuple[int, ...] = (1, 2, 4, 8, 16, 32),
    *,
    rates: tuple[float, ...] | None = None,
    duration: float | None = 30.0,
    requests: int | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Latency percentiles vs load: a closed loop at each concurrency, or an open loop at each of `rates`
    (then `concurrencies` is unused). One summary per point, in order; synchronous."""
    points = (
        [dict(mode="open", rate=r) for r in rates] if rates else [dict(concurrency=c) for c in concurrencies]
    )
    limits = dict(duration=duration, requests=None if rates else requests)
    return [run(target, workload, names, **point, **limits, **kwargs).summary() for point in points]


def sweep_modules(
    target: str,
    workload: Workload,
    base_dir: Path,
    module_counts: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
    *,
    concurrency: int = 32,
    duration: float | None = 30.0,
    requests: int | None = None,
    modules_dir: Path | None = None,
    token: str | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Throughput vs number of distinct modules: for each count, the workload with that many modules
    (registered by `prepare`) in a closed loop at `concurrency`. One summary per count; synchronous."""
    out = []
    for n in module_counts:
        w = replace(workload, modules=n)
        names = asyncio.run(prepare(target, w, base_dir, modules_dir, token=token))
        limits = dict(concurrency=concurrency, duration=duration, requests=requests)
        out.append(run(target, w, names, token=token, **limits, **kwargs).summary())
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="HOST:PORT of a running server (modules are registered on it)")
    where.add_argument("--model", help="start a server in this process: default, tiny or a model directory")
    p.add_argument("--token-file", type=Path, help="--target: admin token (to register the modules)")
    p.add_argument("--base", help="--target: the model the modules are made for (default: what it serves)")
    p.add_argument("--modules-dir", type=Path, help="where the module files are made (default: a cache)")
    p.add_argument("--mode", choices=("closed", "open"), default="closed")
    p.add_argument("--concurrency", type=int, default=8, help="closed loop: requests in flight")
    p.add_argument("--rate", type=float, help="open loop: arrivals per second")
    p.add_argument("--duration", type=float, help="seconds of load (default 60 unless --requests)")
    p.add_argument("--requests", type=int, help="closed loop: requests in all")
    p.add_argument("--modules", type=int, default=8)
    p.add_argument("--mix", default="prefix=1,prompt=1,lora=1,base=0", help="weights of the kinds and base")
    p.add_argument("--popularity", default="uniform", help="uniform or zipf:S")
    p.add_argument("--prompt-len", default="64", help="N, uniform:A:B or lognormal:MEAN:SIGMA[:MIN:MAX]")
    p.add_argument("--output-len", default="64", help="as --prompt-len; exact (ignore_eos)")
    p.add_argument("--virtual-tokens", type=int, default=16, help="of each prefix and soft prompt")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--connections", type=int, default=4, help="gRPC channels the requests are spread over")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    p.add_argument("--max-batch-size", type=int, default=32, help="--model: the server's batch size")
    p.add_argument("--slots", type=int, default=32, help="--model: the server's device slots for modules")
    p.add_argument("--json", type=Path, help="write the summary here as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    workload = Workload(**{f.name: getattr(args, f.name) for f in fields(Workload) if f.init})
    kwargs = {
        k: getattr(args, k) for k in ("mode", "concurrency", "requests", "rate", "connections", "timeout")
    }
    kwargs |= dict(duration=60.0 if args.duration is None and not args.requests else args.duration)
    kwargs["warmup"] = not args.no_warmup
    if args.target:
        token = args.token_file.read_text().strip() if args.token_file else None
        base_dir = base_model_dir(args.base or asyncio.run(_served_model(args.target, token)))
        names = asyncio.run(prepare(args.target, workload, base_dir, args.modules_dir, token=token))
        report = run(args.target, workload, names, token=token, **kwargs)
    else:
        base_dir = base_model_dir(args.model)
        paths = workload_modules(workload, base_dir, args.modules_dir)
        config = dict(max_batch_size=args.max_batch_size, max_loaded_adapters=args.slots)
        config |= dict(max_lora_rank=max(16, args.lora_rank), max_prefix_tokens=max(128, args.virtual_tokens))
        with serve(base_dir, adapters_dir=paths[0].parent if paths else None, **config) as server:
            report = run(server.target, workload, [p.name for p in paths], **kwargs)
    print(report.table())
    if args.json:
        args.json.write_text(json.dumps(report.summary(), indent=2) + "\n")
    return 1 if report.errors() else 0


async def _served_model(target: str, token: str | None) -> str:
    async with AsyncClient(target, timeout=60, token=token) as client:
        model = (await client.model_info()).model
    if model != "default" and not Path(model).is_dir():
        raise SystemExit(f"{target} serves {model!r}, not a directory here: say which with --base")
    return model


if __name__ == "__main__":
    sys.exit(main())
