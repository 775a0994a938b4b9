"""`make bench` in miniature: the orchestrator runs its comparisons on the tiny model and writes its
table, its figures and its plots. No timing is asserted; (b), (c) and (e) have their own smoke tests."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench


@pytest.mark.timeout(300)
def test_bench_prints_ratios_and_writes_figures_and_plots(tmp_path, capsys):
    assert (
        bench.main(["--model", "tiny", "--size", "smoke", "--only", "a,d,f,plots", "--out", str(tmp_path)])
        == 0
    )
    printed = capsys.readouterr().out
    for title in ("(a) 32 distinct modules", "(d) hot swap", "(f) RSS"):
        assert title in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["a"]["ratio"] > 0 and results["f"]["ratio"] > 0
    assert [p["modules"] for p in results["plots"]["by_modules"]] == [0, 1, 3]
    assert all(p["errors"] == 0 for p in results["plots"]["by_modules"] + results["plots"]["by_load"])
    for png in ("throughput_vs_modules.png", "latency_vs_load.png"):
        assert (tmp_path / png).read_bytes().startswith(b"\x89PNG")
