"""Tokens per second of one request and of N concurrent requests against a running server.

    python -m benchmarks.concurrency --target 127.0.0.1:50051 --concurrency 1 16 --new-tokens 64

Every request generates exactly --new-tokens tokens (ignore_eos), greedy, from distinct prompts.
The full harness (open / closed loop, module mixes, side-by-side comparisons) comes with the
benchmarks issue; this is the quick figure for one server.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from plugboard_client import AsyncClient

PROMPT = "Write a long story about a robot who learns to paint landscapes in the mountains. Part {i}."


async def run(target: str, concurrency: int, new_tokens: int, rounds: int) -> dict[str, float]:
    async with AsyncClient(target, timeout=600) as c:
        await c.generate(PROMPT.format(i=-1), max_new_tokens=4, ignore_eos=True)  # warm the path
        rates, ttfts = [], []
        for r in range(rounds):
            start = time.perf_counter()
            results = await asyncio.gather(
                *(
                    c.generate(
                        PROMPT.format(i=r * concurrency + i), max_new_tokens=new_tokens, ignore_eos=True
                    )
                    for i in range(concurrency)
                )
            )
            elapsed = time.perf_counter() - start
            rates.append(sum(x.generated_tokens for x in results) / elapsed)
            ttfts.extend(x.timing.first_token_seconds for x in results)
    return {"tokens_per_s": statistics.median(rates), "ttft_p50_s": statistics.median(ttfts)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(f"{'concurrent':>10} {'tokens/s':>10} {'ttft p50 s':>11}")
    for n in args.concurrency:
        r = asyncio.run(run(args.target, n, args.new_tokens, args.rounds))
        print(f"{n:>10} {r['tokens_per_s']:>10.1f} {r['ttft_p50_s']:>11.3f}")


if __name__ == "__main__":
    main()
