"""(a) A batch of distinct modules vs the same batch on the base model, side by side in one run.

    python -m benchmarks.module_mix --modules 32 --concurrency 32 --new-tokens 64

(a) `concurrency` greedy requests on the base model; (b) the same prompts, each request with its own
module, the modules spread over the three kinds (prefix, soft prompt, LoRA). Every request
generates exactly `new-tokens` tokens. Rounds alternate a and b; medians are reported, with b/a
(target >= 0.90). The modules are made with PEFT (random weights: this measures speed, not quality).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from benchmarks.common import CACHE, base_model_dir, make_modules, serve
from plugboard_client import AsyncClient

PROMPT = "Write a short story about a robot who learns to paint. Chapter {i}:"
TARGET = 0.90


async def _round(target: str, adapters: list[str], new_tokens: int) -> float:
    async with AsyncClient(target, timeout=900) as c:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(
                c.generate(PROMPT.format(i=i), adapter=a, max_new_tokens=new_tokens, ignore_eos=True)
                for i, a in enumerate(adapters)
            )
        )
        elapsed = time.perf_counter() - start
    return sum(r.generated_tokens for r in results) / elapsed


def run(
    model: str = "default",
    modules: int = 32,
    concurrency: int = 32,
    new_tokens: int = 64,
    rounds: int = 3,
    virtual_tokens: int = 16,
    lora_rank: int = 8,
) -> dict:
    base_dir = base_model_dir(model)
    # The server imports every subdirectory: one directory per set of modules.
    adapters_dir = CACHE / "module-mix" / f"{base_dir.name}-{modules}-t{virtual_tokens}-r{lora_rank}"
    paths = make_modules(base_dir, adapters_dir, modules, tokens=virtual_tokens, rank=lora_rank)
    names = [p.name for p in paths]
    rates: dict[str, list[float]] = {"base": [], "mixed": []}
    with serve(
        base_dir,
        adapters_dir=adapters_dir,
        max_batch_size=concurrency,
        max_loaded_adapters=max(modules, 1),
        max_lora_rank=max(lora_rank, 8),
    ) as server:
        base = [""] * concurrency
        mixed = [names[i % len(names)] for i in range(concurrency)]
        asyncio.run(_round(server.target, mixed, 4))  # warm: read every module, give each a slot
        for _ in range(rounds):
            rates["base"].append(asyncio.run(_round(server.target, base, new_tokens)))
            rates["mixed"].append(asyncio.run(_round(server.target, mixed, new_tokens)))
    a, b = statistics.median(rates["base"]), statistics.median(rates["mixed"])
    return {
        "name": "(a) distinct modules vs base model",
        "base_tokens_per_s": a,
        "mixed_tokens_per_s": b,
        "rounds": rates,
        "ratio": b / a,
        "target": f">= {TARGET}",
        "holds": b / a >= TARGET,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--modules", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--virtual-tokens", type=int, default=16, help="of each prefix and soft prompt")
    p.add_argument("--lora-rank", type=int, default=8)
    a = p.parse_args()
    r = run(a.model, a.modules, a.concurrency, a.new_tokens, a.rounds, a.virtual_tokens, a.lora_rank)

    def show(label: str, rate: float, rounds: list[float]) -> None:
        print(f"  {label:<26}{rate:8.1f} tokens/s   rounds: {', '.join(f'{x:.1f}' for x in rounds)}")

    print(
        f"{a.concurrency} concurrent greedy requests of {a.new_tokens} tokens; medians of {a.rounds} rounds"
    )
    show("base model only", r["base_tokens_per_s"], r["rounds"]["base"])
    show(f"{a.modules} distinct modules", r["mixed_tokens_per_s"], r["rounds"]["mixed"])
    print(f"  mixed/base = {r['ratio']:.3f} (target {r['target']})")


if __name__ == "__main__":
    main()
