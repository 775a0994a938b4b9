"""The plots of docs/benchmarks.md, from load-generator sweeps on one in-process server.

    python -m benchmarks.plots --out docs/img

- throughput_vs_modules.png: output tokens/s of a closed loop at the batch size, over 0 (base model
  only), 1, 4, ... distinct modules (the three kinds in turn);
- latency_vs_load.png: time to first token and time per output token, p50 / p90 / p99, over the
  number of concurrent clients.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from benchmarks.common import base_model_dir, serve
from benchmarks.loadgen import prepare, sweep_load, sweep_modules
from benchmarks.workload import Workload


def make(
    model: str,
    out: Path,
    *,
    module_counts: tuple[int, ...] = (1, 4, 16, 32),
    concurrencies: tuple[int, ...] = (1, 4, 16, 32),
    requests: int = 64,
    new_tokens: int = 32,
) -> dict[str, Any]:
    """Run both sweeps (each point a fixed number of requests) and write the two PNGs into `out`."""
    base_dir = base_model_dir(model)
    batch = max(concurrencies)
    workload = Workload(modules=max(module_counts), prompt_len=32, output_len=new_tokens)
    with serve(base_dir, max_batch_size=batch, max_loaded_adapters=max(max(module_counts), 1)) as server:
        by_modules = sweep_modules(
            server.target, workload, base_dir, (0, *module_counts), concurrency=batch, requests=requests
        )
        names = asyncio.run(prepare(server.target, workload, base_dir))
        by_load = sweep_load(server.target, workload, names, concurrencies, requests=requests, duration=None)
    out.mkdir(parents=True, exist_ok=True)
    plt.switch_backend("Agg")  # files only, no display
    _throughput(by_modules, batch, out / "throughput_vs_modules.png", model)
    _latency(by_load, out / "latency_vs_load.png", model, workload.modules)
    return {"by_modules": by_modules, "by_load": by_load}


def _throughput(points: list[dict], batch: int, path: Path, model: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["modules"] for p in points]
    ax.plot(xs, [p["output_tokens_per_s"] for p in points], marker="o")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("distinct modules in the batch (0 = base model only)")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"{model}: {batch} concurrent requests")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _latency(points: list[dict], path: Path, model: str, modules: int) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    xs = [p["concurrency"] for p in points]
    for ax, metric, label in (
        (axes[0], "ttft", "time to first token"),
        (axes[1], "tpot", "time per output token"),
    ):
        for q in ("p50", "p90", "p99"):
            ax.plot(xs, [(p[f"{metric}_{q}_s"] or 0) * 1000 for p in points], marker="o", label=q)
        ax.set_xticks(xs)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("ms")
        ax.set_title(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{model}: {modules} modules, closed loop")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--out", type=Path, default=Path("docs/img"))
    p.add_argument("--requests", type=int, default=64, help="per point")
    args = p.parse_args()
    make(args.model, args.out, requests=args.requests)
    print(f"wrote {args.out}/throughput_vs_modules.png and latency_vs_load.png")


if __name__ == "__main__":
    main()
