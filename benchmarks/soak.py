"""Load and soak: many clients over modules of every kind while the registry churns; every output checked.

    python -m benchmarks.soak --clients 64 --modules 50 --duration 600     # spawns a default-model server
    python -m benchmarks.soak --target HOST:PORT --pid PID --token-file F   # a server already running

`clients` tasks send greedy requests in a closed loop, each to the base model, to a stable module
(`soak-NNN` by name, `@1` or its `stable` alias) or to a churned one (`churn-J@live`). Meanwhile churn
tasks publish new versions of the churned modules (content drawn from the same pool), move `live` to
them, delete versions some seconds after they left the alias, and publish, serve and delete whole
temporary modules. Each answer is compared with the same request served alone before the load (one
reference per module content and prompt; the answer's resolved `adapter` says which content served
it). RESOURCE_EXHAUSTED is backpressure: the client waits the server's hint and retries (counted as
refused, not as an error). Reported: requests, wrong outputs, errors by status, latency percentiles,
RSS of the server over time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import make_modules
from plugboard_client import AsyncClient, PlugboardError, ResourceExhausted
from plugboard_server.models.default import provision

PROMPTS = (
    "The weather today is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three most important things about",
)


@dataclass
class SoakConfig:
    clients: int = 16
    duration: float = 60.0
    churners: int = 1
    churn_modules: int = 4
    max_new_tokens: int = 8
    retire_after: float = 5.0  # seconds a version stays after `live` moves off it, then it is deleted
    request_timeout: float = 120.0
    seed: int = 0


@dataclass
class SoakReport:
    requests: int = 0
    wrong: int = 0
    wrong_examples: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)  # unexpected, by status code
    refused: int = 0  # RESOURCE_EXHAUSTED, retried after the hint
    latencies: list[float] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, bytes)
    churn: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def percentile(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    def summary(self) -> dict[str, object]:
        rss = [b for _, b in self.rss]
        return {
            "seconds": round(self.seconds, 1),
            "requests_served": self.requests,
            "requests_per_second": round(self.requests / self.seconds, 2) if self.seconds else 0.0,
            "wrong_outputs": self.wrong,
            "errors_by_status": dict(self.errors),
            "refused_resource_exhausted": self.refused,
            "latency_p50_s": round(self.percentile(0.50), 4),
            "latency_p90_s": round(self.percentile(0.90), 4),
            "latency_p99_s": round(self.percentile(0.99), 4),
            "rss_start_mib": round(rss[0] / 2**20, 1) if rss else None,
            "rss_end_mib": round(rss[-1] / 2**20, 1) if rss else None,
            "rss_max_mib": round(max(rss) / 2**20, 1) if rss else None,
            "churn": dict(self.churn),
            "wrong_examples": self.wrong_examples[:5],
        }


class _Served:
    """What each resolved module version holds (content index; None = the base model)."""

    def __init__(self) -> None:
        self.content: dict[str, int | None] = {"": None}
        self.references: dict[tuple[int | None, int], str] = {}

    def expected(self, key: str, prompt: int) -> str | None:
        if key not in self.content:
            return None
        return self.references[(self.content[key], prompt)]


async def soak(
    target: str,
    modules: list[Path],
    config: SoakConfig,
    *,
    token: str | None = None,
    rss: Callable[[], int] | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> SoakReport:
    """Publish `modules` (the content pool), take references alone, then run the load with churn."""
    report, served = SoakReport(), _Served()
    async with AsyncClient(target, timeout=config.request_timeout, token=token) as admin:
        await admin.wait_ready(300)
        await _publish_pool(admin, modules, config, served)
        progress(f"published {len(modules)} modules; taking {len(PROMPTS) * (len(modules) + 1)} references")
        for content in [None, *range(len(modules))]:
            ref = "" if content is None else f"soak-{content:03d}@1"
            for p, prompt in enumerate(PROMPTS):
                answer = await admin.generate(prompt, adapter=ref, max_new_tokens=config.max_new_tokens)
                served.references[(content, p)] = answer.text
        progress(f"load: {config.clients} clients, {config.churners} churners, {config.duration:.0f} s")
        start = time.monotonic()
        end = start + config.duration
        tasks = [
            *(_client(i, target, token, config, served, report, end) for i in range(config.clients)),
            *(_churner(k, admin, modules, config, served, report, end) for k in range(config.churners)),
        ]
        if rss is not None:
            tasks.append(_sample_rss(rss, report, start, end, progress))
        await asyncio.gather(*tasks)
        report.seconds = time.monotonic() - start
    return report


async def _publish_pool(admin: AsyncClient, modules: list[Path], config: SoakConfig, served: _Served) -> None:
    for i, directory in enumerate(modules):
        info = await admin.register_adapter(directory, name=f"soak-{i:03d}", alias="stable")
        served.content[info.ref] = i
    for j in range(config.churn_modules):
        content = j % len(modules)
        info = await admin.register_adapter(modules[content], name=f"churn-{j}", alias="live")
        served.content[info.ref] = content


def _pick(rng: random.Random, config: SoakConfig, modules: int) -> str:
    roll = rng.random()
    if roll < 0.1:
        return ""
    if roll < 0.7:
        name = f"soak-{rng.randrange(modules):03d}"
        return rng.choice((name, f"{name}@1", f"{name}@stable"))
    return f"churn-{rng.randrange(config.churn_modules)}@live"


async def _client(
    i: int,
    target: str,
    token: str | None,
    config: SoakConfig,
    served: _Served,
    report: SoakReport,
    end: float,
) -> None:
    rng = random.Random(config.seed * 10_007 + i)
    modules = sum(1 for key in served.content if key.startswith("soak-"))
    async with AsyncClient(target, timeout=config.request_timeout, token=token) as c:
        while time.monotonic() < end:
            ref, p = _pick(rng, config, modules), rng.randrange(len(PROMPTS))
            try:
                answer, seconds = await _generate(c, report, PROMPTS[p], ref, config.max_new_tokens, end)
            except PlugboardError as exc:
                report.errors[exc.code.name] += 1
                continue
            if answer is None:
                return  # the load ended while this request was being refused
            report.latencies.append(seconds)
            report.requests += 1
            _check(report, served, ref, answer.adapter, p, answer.text)


async def _generate(
    c: AsyncClient, report: SoakReport, prompt: str, ref: str, max_new_tokens: int, end: float
) -> tuple[Any, float]:
    """Generate, waiting out backpressure as the server asks -> (answer or None after `end`, seconds
    the served attempt took)."""
    while True:
        start = time.perf_counter()
        try:
            answer = await c.generate(prompt, adapter=ref, max_new_tokens=max_new_tokens)
            return answer, time.perf_counter() - start
        except ResourceExhausted as exc:
            report.refused += 1
            if time.monotonic() >= end:
                return None, 0.0
            await asyncio.sleep(exc.retry_after or 0.1)


def _check(report: SoakReport, served: _Served, ref: str, key: str, prompt: int, text: str) -> None:
    expected = served.expected(key, prompt)
    if expected != text:
        report.wrong += 1
        report.wrong_examples.append(f"{ref!r} -> {key!r} prompt {prompt}: {text!r} != {expected!r}")


async def _churner(
    k: int,
    admin: AsyncClient,
    modules: list[Path],
    config: SoakConfig,
    served: _Served,
    report: SoakReport,
    end: float,
) -> None:
    rng = random.Random(config.seed * 7_919 + k)
    mine = [j for j in range(config.churn_modules) if j % config.churners == k]
    retired: list[tuple[float, str]] = []  # (when `live` moved off it, ref)
    count = 0
    while time.monotonic() < end:
        try:
            if mine and rng.random() < 0.75:
                await _republish(rng.choice(mine), rng, admin, modules, served, report, retired)
            else:
                await _temporary(f"temp-{k}-{count}", rng, admin, modules, config, served, report)
            count += 1
            while retired and time.monotonic() - retired[0][0] > config.retire_after:
                await admin.delete_adapter(retired.pop(0)[1])
                report.churn["version_deletes"] += 1
        except PlugboardError as exc:
            report.errors[f"churn:{exc.code.name}"] += 1
        await asyncio.sleep(0.05)


async def _republish(
    j: int,
    rng: random.Random,
    admin: AsyncClient,
    modules: list[Path],
    served: _Served,
    report: SoakReport,
    retired: list[tuple[float, str]],
) -> None:
    """A new version of churn-j with some pool content; `live` moves to it once it is recorded."""
    name = f"churn-{j}"
    previous = (await admin.get_adapter(f"{name}@live")).version
    content = rng.randrange(len(modules))
    info = await admin.register_adapter(modules[content], name=name)
    served.content[info.ref] = content
    await admin.set_alias(name, "live", info.version)
    retired.append((time.monotonic(), f"{name}@{previous}"))
    report.churn["publishes"] += 1
    report.churn["alias_moves"] += 1


async def _temporary(
    name: str,
    rng: random.Random,
    admin: AsyncClient,
    modules: list[Path],
    config: SoakConfig,
    served: _Served,
    report: SoakReport,
) -> None:
    """Publish a whole module, serve it once (checked), delete it; then it must be NOT_FOUND."""
    content = rng.randrange(len(modules))
    info = await admin.register_adapter(modules[content], name=name)
    served.content[info.ref] = content
    p = rng.randrange(len(PROMPTS))
    answer, _ = await _generate(admin, report, PROMPTS[p], name, config.max_new_tokens, float("inf"))
    report.requests += 1
    _check(report, served, name, answer.adapter, p, answer.text)
    await admin.delete_adapter(name, force=True)
    report.churn["module_deletes"] += 1
    try:
        await admin.generate(PROMPTS[p], adapter=name, max_new_tokens=1)
        report.errors["deleted module still served"] += 1
    except PlugboardError as exc:
        if exc.code.name != "NOT_FOUND":
            raise


async def _sample_rss(
    rss: Callable[[], int], report: SoakReport, start: float, end: float, progress: Callable[[str], None]
) -> None:
    last_line = start
    while True:
        now = time.monotonic()
        report.rss.append((now - start, rss()))
        if now - last_line >= 30:
            last_line = now
            progress(
                f"{now - start:5.0f}s requests {report.requests} wrong {report.wrong} "
                f"errors {sum(report.errors.values())} refused {report.refused} "
                f"rss {report.rss[-1][1] / 2**20:.0f} MiB"
            )
        if now >= end:
            return
        await asyncio.sleep(1.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_server(
    model: str, registry: Path, token_file: Path, extra: list[str]
) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    command = [
        sys.executable, "-m", "plugboard_server.main", "--model", model, "--port", str(port),
        "--metrics-port", "-1", "--registry", str(registry), "--admin-token-file", str(token_file),
        "--log-level", "warning", *extra,
    ]  # fmt: skip
    return subprocess.Popen(command), f"127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--modules", type=int, default=50, help="stable modules, cycling prefix / prompt / LoRA")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--churners", type=int, default=2)
    p.add_argument("--churn-modules", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="default", help="model of the spawned server")
    p.add_argument("--target", help="a running server instead of a spawned one")
    p.add_argument("--pid", type=int, help="the running server's process id (for its RSS)")
    p.add_argument("--token-file", type=Path, help="admin token of the running server")
    p.add_argument("--modules-dir", type=Path, default=Path(tempfile.gettempdir()) / "plugboard-soak-modules")
    p.add_argument("--report", type=Path, help="write the summary as JSON here too")
    p.add_argument("server_args", nargs="*", help="after --: more flags for the spawned server")
    args = p.parse_args(argv)

    base_dir = provision() if args.model == "default" else Path(args.model)
    modules = make_modules(base_dir, args.modules_dir, args.modules, tokens=16, rank=8)
    config = SoakConfig(
        clients=args.clients,
        duration=args.duration,
        churners=args.churners,
        churn_modules=args.churn_modules,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    with tempfile.TemporaryDirectory(prefix="plugboard-soak-") as tmp:
        process = None
        if args.target:
            target, pid = args.target, args.pid
            token = args.token_file.read_text().strip() if args.token_file else None
        else:
            token = secrets.token_urlsafe(24)
            token_file = Path(tmp) / "admin-token"
            token_file.write_text(token)
            process, target = _spawn_server(args.model, Path(tmp) / "registry", token_file, args.server_args)
            pid = process.pid
        rss = (lambda: psutil.Process(pid).memory_info().rss) if pid else None
        try:
            report = asyncio.run(soak(target, modules, config, token=token, rss=rss, progress=print))
        finally:
            if process is not None:
                process.terminate()
                process.wait(60)
    summary = report.summary()
    print(json.dumps(summary, indent=2))
    if args.report:
        args.report.write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if report.wrong or report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
