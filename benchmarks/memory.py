"""(f) Server memory over many module load / evict cycles: RSS after 10,000 cycles vs after the first 100.

    python -m benchmarks.memory --cycles 10000 --sample-every 500 --generate-every 10

A cycle is LoadAdapter then UnloadAdapter of the next module in turn among `per_kind` modules of
each kind (prefix, soft prompt, LoRA; PEFT-made templates plus noise, as in benchmarks.scale): read
from disk, checksummed, validated, put into a device slot and pinned, then unpinned and evicted from
both tiers (the next load of it reads the disk again). In every `generate_every`-th pass over the
modules (so one cycle in `generate_every`, on every module), a short greedy Generate on the module
while it is loaded runs the slot path too (a LoRA written into its slot buffers, a prefix's or
soft prompt's rows in the batch).

The server runs in this process (its own thread and event loop, as in the other benchmarks), so the
RSS measured (psutil, this process) is the server's plus the small client's and the model's.
`gc.collect()` runs before each sample; before the first cycle, once, glibc's malloc_trim gives back
free heap pages that earlier work in this process left (benchmarks.bench runs the others first;
`python -m benchmarks.memory` alone is the cleaner figure). Samples after `first` (100) cycles, then
every `sample_every` cycles and at the end; the ratio is the last over the first (target < 1.05).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import shutil
import tempfile
import time
from pathlib import Path

import psutil
import torch

from benchmarks.common import CACHE, base_model_dir, serve
from benchmarks.scale import templates, write_module
from plugboard_client import Client

TARGET = 1.05
PROMPT = "The weather today is"


def run(
    model: str = "default",
    cycles: int = 10_000,
    sample_every: int = 500,
    generate_every: int = 10,
    first: int = 100,
    per_kind: int = 2,
    slots: int = 4,
    virtual_tokens: int = 16,
    lora_rank: int = 8,
    cache: Path = CACHE,
) -> dict:
    """RSS of this process (the in-process server) over `cycles` load / evict cycles."""
    if cycles < 1 or sample_every < 1:
        raise ValueError("cycles and sample_every must be positive")
    first = min(first, cycles)
    base_dir = base_model_dir(model)
    bases = templates(base_dir, cache, virtual_tokens, lora_rank)
    work = Path(tempfile.mkdtemp(prefix="plugboard-memory-"))
    gen = torch.Generator().manual_seed(0)
    names = []
    for i in range(per_kind * len(bases)):  # imported by the server at start: one subdirectory each
        names.append(f"{bases[i % len(bases)][0]}-{i:02d}")
        (work / "modules" / names[-1]).mkdir(parents=True)
        write_module(bases[i % len(bases)], work / "modules" / names[-1], gen)
    me = psutil.Process()
    samples: list[tuple[int, int]] = []  # (cycles done, RSS bytes)
    generated = 0
    sampling_s = 0.0

    def sample(done: int) -> None:
        nonlocal sampling_s
        start = time.perf_counter()
        gc.collect()
        samples.append((done, me.memory_info().rss))
        sampling_s += time.perf_counter() - start

    with (
        serve(
            base_dir,
            registry=work / "registry",
            adapters_dir=work / "modules",
            max_loaded_adapters=slots,
            max_lora_rank=lora_rank,
            max_prefix_tokens=max(virtual_tokens, 1),
        ) as server,
        Client(server.target, timeout=600) as c,
    ):
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):  # glibc: free heap pages back to the OS, once
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        start_rss = me.memory_info().rss
        start = time.perf_counter()
        for i in range(cycles):
            name = names[i % len(names)]
            c.load_adapter(name)
            if generate_every and (i // len(names)) % generate_every == 0:  # every module, each Nth pass
                c.generate(PROMPT, adapter=name, max_new_tokens=2, ignore_eos=True)
                generated += 1
            c.unload_adapter(name)
            done = i + 1
            if done in (first, cycles) or done % sample_every == 0:
                sample(done)
        elapsed = time.perf_counter() - start - sampling_s
    shutil.rmtree(work, ignore_errors=True)
    at_first = next(rss for n, rss in samples if n == first)
    last = samples[-1][1]
    ratio = last / at_first
    return {
        "name": f"(f) RSS after {cycles} load/evict cycles vs after {first}",
        "modules": names,
        "cycles": cycles,
        "first": first,
        "generates": generated,
        "cycles_per_s": cycles / elapsed,
        "rss_start_mib": start_rss / 2**20,
        "rss_mib": [(n, rss / 2**20) for n, rss in samples],
        "rss_first_mib": at_first / 2**20,
        "rss_last_mib": last / 2**20,
        "ratio": ratio,
        "target": f"< {TARGET}",
        "holds": ratio < TARGET,
    }


def report(r: dict) -> str:
    series, ref = r["rss_mib"], r["rss_first_mib"]
    lines = [
        r["name"],
        f"{len(r['modules'])} modules ({', '.join(r['modules'])}); "
        f"{r['generates']} generates on a loaded module",
        f"{r['cycles_per_s']:.1f} cycles/s; RSS of this process (server in-process, gc.collect() before each "
        f"sample): {r['rss_start_mib']:.1f} MiB before the first cycle",
        f"{'cycles':>8} {'RSS MiB':>9} {'vs first':>9}",
    ]
    lines += [f"{n:>8} {mib:>9.1f} {mib / ref:>9.3f}" for n, mib in series]
    lines.append(
        f"RSS after {r['cycles']} / after {r['first']} cycles = {r['ratio']:.3f} "
        f"(target {r['target']}: {'holds' if r['holds'] else 'MISSED'})"
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default', 'tiny' or a model directory")
    p.add_argument("--cycles", type=int, default=10_000, help="load / evict cycles")
    p.add_argument("--sample-every", type=int, default=500, help="cycles between RSS samples")
    p.add_argument(
        "--generate-every", type=int, default=10, help="a Generate on each module every Nth pass (0: never)"
    )
    p.add_argument("--first", type=int, default=100, help="cycles before the first (reference) sample")
    p.add_argument("--per-kind", type=int, default=2, help="modules of each kind cycled through")
    p.add_argument("--slots", type=int, default=4, help="--max-loaded-adapters")
    a = p.parse_args()
    r = run(
        a.model,
        cycles=a.cycles,
        sample_every=a.sample_every,
        generate_every=a.generate_every,
        first=a.first,
        per_kind=a.per_kind,
        slots=a.slots,
    )
    print(report(r))


if __name__ == "__main__":
    main()
