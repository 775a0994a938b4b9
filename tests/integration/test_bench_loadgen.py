"""Smoke test of benchmarks.loadgen on the tiny model: both loops complete and their counts add up.

A few seconds of load each, no timing assertions (the figures of a shared CPU mean nothing).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from dataclasses import replace

import pytest

from benchmarks.loadgen import LoadReport, main, prepare, run, sweep_load, sweep_modules
from benchmarks.workload import Lengths, Workload
from plugboard_client import Client
from tests.support.server import ServerThread, server_config

WORKLOAD = Workload(
    modules=6,
    mix="prefix=1,prompt=1,lora=1,base=1",
    popularity="zipf:1.2",
    prompt_len="uniform:8:24",
    output_len="uniform:2:8",
    virtual_tokens=4,
    lora_rank=4,
)


@pytest.fixture(scope="module")
def loaded(tiny_model, tiny_model_dir, tmp_path_factory):
    """A server with the workload's modules registered -> (server, their names, the modules' directory)."""
    srv = ServerThread(
        server_config(max_batch_size=4, max_loaded_adapters=4), loader=lambda: tiny_model
    ).start()
    modules_dir = tmp_path_factory.mktemp("loadgen-modules")
    try:
        names = asyncio.run(prepare(srv.target, WORKLOAD, tiny_model_dir, modules_dir))
        yield srv, names, modules_dir
    finally:
        srv.stop()


def _consistent(report: LoadReport) -> dict:
    s = report.summary()
    assert s["requests"] == len(report.records) == s["successes"] + s["errors"] > 0
    assert s["errors"] == 0, s["errors_by_status"]
    assert s["output_tokens"] == s["output_tokens_drawn"] == sum(r.spec.output_tokens for r in report.records)
    assert [r.spec.seq for r in report.records] == list(range(len(report.records)))
    for metric in ("ttft", "tpot", "latency"):
        assert 0 <= s[f"{metric}_p50_s"] <= s[f"{metric}_p90_s"] <= s[f"{metric}_p99_s"], s
    assert s["requests_per_s"] > 0 and s["output_tokens_per_s"] > 0
    assert s["prompt_tokens_mean"] > 0
    return s


def test_a_closed_loop_completes_with_consistent_counts(loaded):
    srv, names, _ = loaded
    report = run(srv.target, WORKLOAD, names, mode="closed", concurrency=4, duration=3.0)
    s = _consistent(report)
    assert s["mode"] == "closed" and s["concurrency"] == 4
    assert set(s["requests_by_kind"]) <= {"prefix", "prompt", "lora", "base"}
    print(report.table())


def test_a_closed_loop_by_count_sends_exactly_that_many(loaded):
    srv, names, _ = loaded
    report = run(srv.target, WORKLOAD, names, concurrency=3, duration=None, requests=10, warmup=False)
    assert _consistent(report)["requests"] == 10


def test_an_open_loop_completes_and_records_what_is_in_flight(loaded):
    srv, names, _ = loaded
    report = run(srv.target, WORKLOAD, names, mode="open", rate=8.0, duration=2.0)
    s = _consistent(report)
    assert s["mode"] == "open" and s["rate"] == 8.0
    assert len(report.in_flight) == s["requests"] and s["in_flight_max"] >= 1
    assert s["server"]["max_batch_size"] == 4
    print(report.table())


def test_prepare_does_not_register_unchanged_modules_again(loaded, tiny_model_dir):
    srv, names, modules_dir = loaded
    assert asyncio.run(prepare(srv.target, WORKLOAD, tiny_model_dir, modules_dir)) == names
    with Client(srv.target, timeout=30) as c:
        assert [c.get_adapter(n).version for n in names] == [1] * len(names)
        assert [c.get_adapter(n).peft_type for n in names[:3]] == ["PREFIX_TUNING", "PROMPT_TUNING", "LORA"]


def test_sweep_load_and_the_cli(loaded, tiny_model_dir, tmp_path):
    srv, names, modules_dir = loaded
    points = sweep_load(srv.target, WORKLOAD, names, (1, 2), duration=1.0, warmup=False)
    assert [p["concurrency"] for p in points] == [1, 2] and all(p["errors"] == 0 for p in points)
    out = tmp_path / "out.json"
    argv = ["--target", srv.target, "--base", str(tiny_model_dir), "--modules-dir", str(modules_dir)]
    argv += ["--modules", "3", "--popularity", "zipf:1.1", "--prompt-len", "lognormal:12:0.5:4:32"]
    argv += ["--output-len", "4", "--virtual-tokens", "4", "--lora-rank", "4", "--mode", "open"]
    argv += ["--rate", "5", "--duration", "1.5", "--json", str(out)]
    assert main(argv) == 0
    summary = json.loads(out.read_text())
    assert summary["errors"] == 0 and summary["output_tokens"] == 4 * summary["requests"]


def test_sweep_modules_registers_each_count(loaded, tiny_model_dir):
    srv, _, modules_dir = loaded
    points = sweep_modules(
        srv.target, WORKLOAD, tiny_model_dir, (0, 2), concurrency=2, duration=1.0, modules_dir=modules_dir
    )
    assert [p["modules"] for p in points] == [0, 2] and all(p["errors"] == 0 for p in points)
    assert set(points[0]["requests_by_kind"]) == {"base"}


def test_draws_follow_the_workload():
    w = replace(WORKLOAD, modules=9, mix="prefix=2,prompt=1,lora=0,base=1", seed=3)
    assert w.kinds() == ["prefix", "prompt", "prefix"] * 3
    assert replace(w, modules=4).kinds() == w.kinds()[:4]  # fewer modules: the first ones
    sampler = w.sampler([f"m{i}" for i in range(9)])
    draws = [sampler.draw() for _ in range(3000)]
    modules = Counter(d.module for d in draws)
    assert 0.2 < modules[-1] / len(draws) < 0.3  # base = 1 of 4
    assert modules[0] > modules[1] > modules[4] > modules[8]  # Zipf: the first modules are the popular ones
    assert modules[0] > 3 * modules[8]
    assert all(d.adapter == ("" if d.module < 0 else f"m{d.module}") for d in draws)
    assert all(2 <= d.output_tokens <= 8 and 8 <= d.prompt_tokens <= 24 for d in draws)
    again = w.sampler([f"m{i}" for i in range(9)])
    assert [again.draw() for _ in range(50)] == draws[:50]  # the seed fixes the sequence
    uniform_sampler = replace(w, popularity="uniform").sampler([f"m{i}" for i in range(9)])
    uniform = Counter(uniform_sampler.draw().module for _ in range(3000))
    assert max(uniform[i] for i in range(9)) < 2 * min(uniform[i] for i in range(9))


def test_lengths_parse_and_draw_in_range():
    rng = random.Random(0)
    assert Lengths.parse("64") == Lengths.parse("fixed:64") == Lengths.fixed(64)
    assert str(Lengths.parse("uniform:16:128")) == "uniform:16:128"
    lognormal = Lengths.parse("lognormal:64:0.5")
    assert (lognormal.low, lognormal.high) == (1, 256)
    xs = [lognormal.draw(rng) for _ in range(4000)]
    assert 55 < sum(xs) / len(xs) < 73 and min(xs) >= 1 and max(xs) <= 256
    for bad in ("uniform:8", "lognormal:0:1", "uniform:9:3", "zipf:1"):
        with pytest.raises(ValueError):
            Lengths.parse(bad)
    with pytest.raises(ValueError):
        Workload(popularity="pareto")
