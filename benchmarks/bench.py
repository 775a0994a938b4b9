"""`make bench`: the comparisons (a)-(f) of docs/benchmarks.md, each side by side in one run, as ratios.

    python -m benchmarks.bench                      # full sizes, the default model (tens of minutes)
    python -m benchmarks.bench --size quick         # smaller sizes, same comparisons
    python -m benchmarks.bench --only a,b --out var/bench

Prints one table (comparison, figures, ratio, target, holds), writes every figure to OUT/results.json
and the plots (throughput vs number of distinct modules, latency percentiles vs load) to OUT/*.png.
`--size smoke --model tiny` is what `make test` runs so that the harness never rots (no timing
is asserted there).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks import compare_hf, compare_peft, hot_swap, memory, module_mix, plots, scale

# The sizes of each comparison: full = what the issue asks for; quick = the same shape, smaller.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        "a": {"modules": 32, "concurrency": 32, "new_tokens": 64, "rounds": 3},
        "b": {"n": 32, "new_tokens": 64, "rounds": 3},
        "c": {"n": 32, "new_tokens": 64, "rounds": 3, "adapters": 32},
        "d": {"publishes": 20, "cycles": 200},
        "e": {},
        "f": {"cycles": 10_000},
        "plots": {"module_counts": (1, 4, 16, 32), "concurrencies": (1, 4, 16, 32), "requests": 64},
    },
    "quick": {
        "a": {"modules": 16, "concurrency": 16, "new_tokens": 32, "rounds": 2},
        "b": {"n": 16, "new_tokens": 32, "rounds": 2},
        "c": {"n": 16, "new_tokens": 32, "rounds": 2, "adapters": 16},
        "d": {"publishes": 10, "cycles": 100},
        "e": {"quick": True},
        "f": {"cycles": 2_000},
        "plots": {"module_counts": (1, 8, 16), "concurrencies": (1, 8, 16), "requests": 32},
    },
    "smoke": {
        "a": {
            "modules": 3,
            "concurrency": 3,
            "new_tokens": 4,
            "rounds": 1,
            "virtual_tokens": 4,
            "lora_rank": 4,
        },
        "b": {"n": 4, "new_tokens": 4, "rounds": 1},
        "c": {"n": 4, "new_tokens": 4, "rounds": 1, "adapters": 2, "virtual_tokens": 4, "lora_rank": 4},
        "d": {"publishes": 2, "cycles": 110},
        "e": {"smoke": True},
        "f": {"cycles": 200},
        "plots": {"module_counts": (1, 3), "concurrencies": (1, 3), "requests": 6},
    },
}

RUNS: dict[str, tuple[str, Callable[..., dict]]] = {
    "a": ("(a) 32 distinct modules vs base only", module_mix.run),
    "b": ("(b) vs transformers generate", compare_hf.run),
    "c": ("(c) vs PEFT", compare_peft.run),
    "d": ("(d) hot swap", hot_swap.run),
    "e": ("(e) 1,000 modules, 64 slots, Zipf", scale.run),
    "f": ("(f) RSS after many load / evict cycles", memory.run),
}


def rows(key: str, result: dict) -> list[tuple[str, str, float, str, Any]]:
    """(comparison, figures, ratio, target, holds) for the table."""
    title = RUNS[key][0]
    if key == "d":
        pub = result["publish_to_first_ms"]
        figures = ", ".join(f"{k} p50 {v['p50']:.0f} / p99 {v['p99']:.0f} ms" for k, v in pub.items())
        loads = ", ".join(f"{k} {v['mean']:.1f} ms" for k, v in result["load_ms"].items())
        dev = ", ".join(f"{k} {v:.1f} ms" for k, v in result["device_tier_ms"].items())
        return [
            (f"{title}: publish -> first served request", figures, math.nan, "", None),
            (
                f"{title}: load from disk, host; 1-token request in a slot",
                f"{loads}; {dev}",
                math.nan,
                "",
                None,
            ),
        ]
    if key == "f":
        figures = (
            f"RSS {result['rss_first_mib']:.1f} MiB after the first cycles, {result['rss_last_mib']:.1f} MiB "
            f"at the end; {result['cycles_per_s']:.0f} cycles/s"
        )
        return [(title, figures, result["ratio"], str(result["target"]), result["holds"])]
    cases = result.get("cases") or {"": result}
    out = []
    for name, case in cases.items():
        figures = ", ".join(
            f"{k.removesuffix('_tokens_per_s')} {v:.1f} tok/s"
            for k, v in case.items()
            if k.endswith("_tokens_per_s") and isinstance(v, float)
        )
        out.append((f"{title} {name}".strip(), figures, case["ratio"], str(case["target"]), case["holds"]))
    return out


def table(all_rows: list[tuple[str, str, float, str, Any]]) -> str:
    lines = [f"{'comparison':<58} {'ratio':>7}  {'target':<8} holds  figures"]
    for title, figures, ratio, target, holds in all_rows:
        mark = "" if holds is None else ("yes" if holds else "NO")
        shown = "" if math.isnan(ratio) else f"{ratio:7.3f}"
        lines.append(f"{title:<58} {shown:>7}  {target:<8} {mark:<5}  {figures}")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="default, tiny, or a model directory")
    p.add_argument("--size", default="full", choices=tuple(SIZES))
    p.add_argument("--only", default="a,b,c,d,e,f,plots", help="comma-separated: a..f, plots")
    p.add_argument("--out", type=Path, default=Path("var/bench"))
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = args.only.split(",")
    results: dict[str, Any] = {"machine": machine(), "model": args.model, "size": args.size}
    all_rows = []
    for key, (title, run) in RUNS.items():
        if key not in wanted:
            continue
        print(f"running {title} ...", flush=True)
        start = time.perf_counter()
        results[key] = run(model=args.model, **SIZES[args.size][key])
        results[key]["seconds"] = time.perf_counter() - start
        all_rows += rows(key, results[key])
        print(table(rows(key, results[key])), flush=True)
    if "plots" in wanted:
        print("running the sweeps for the plots ...", flush=True)
        results["plots"] = plots.make(args.model, args.out, **SIZES[args.size]["plots"])
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print()
    print(table(all_rows))
    print(f"\nfigures: {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
