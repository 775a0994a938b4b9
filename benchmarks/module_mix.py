"""Mixed-module batch vs base-only batch, side by side in one run, on the embedded default model.

    python -m benchmarks.module_mix --modules 32 --concurrency 32 --new-tokens 64

(a) `concurrency` greedy requests on the base model; (b) the same prompts, each request with its own
module, the modules spread over the three kinds (prefix, soft prompt, LoRA). Every request
generates exactly `new-tokens` tokens. Rounds alternate a and b; medians are reported, with b/a.
The modules are made with PEFT (random weights: this measures speed, not quality) and cached.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from plugboard_client import AsyncClient
from plugboard_server.models.default import provision
from plugboard_server.models.loading import load_model
from tests.support import peft_modules as pm
from tests.support.server import ServerThread, server_config

PROMPT = "Write a short story about a robot who learns to paint. Chapter {i}:"


def make_modules(base_dir: Path, root: Path, count: int, tokens: int, rank: int) -> list[str]:
    """`count` modules cycling prefix / soft prompt / LoRA (q_proj, v_proj), built once into root."""
    names = []
    for i in range(count):
        kind = ("prefix", "prompt", "lora")[i % 3]
        name = f"{kind}-{i:03d}"
        out = root / name
        if not (out / "adapter_model.safetensors").is_file():
            if kind == "prefix":
                pm.prefix(base_dir, out, tokens=tokens, seed=i)
            elif kind == "prompt":
                pm.prompt_tuning(base_dir, out, tokens=tokens, seed=i)
            else:
                pm.lora(base_dir, out, targets=["q_proj", "v_proj"], r=rank, alpha=2 * rank, seed=i)
        names.append(name)
    return names


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modules", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--virtual-tokens", type=int, default=16, help="of each prefix and soft prompt")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument(
        "--modules-dir", type=Path, default=Path(tempfile.gettempdir()) / "plugboard-bench-modules"
    )
    args = p.parse_args()

    base_dir = provision()
    root = args.modules_dir / f"t{args.virtual_tokens}-r{args.lora_rank}"
    names = make_modules(base_dir, root, args.modules, args.virtual_tokens, args.lora_rank)
    config = server_config(
        adapters_dir=root,
        max_batch_size=args.concurrency,
        max_loaded_adapters=max(args.modules, 1),
        max_lora_rank=max(args.lora_rank, 8),
        metrics_port=-1,
    )
    server = ServerThread(config, loader=lambda: load_model(str(base_dir))).start()
    try:
        base = [""] * args.concurrency
        mixed = [names[i % len(names)] for i in range(args.concurrency)]
        asyncio.run(_round(server.target, mixed, 4))  # warm: read every module, give each a slot
        rates: dict[str, list[float]] = {"base": [], "mixed": []}
        for _ in range(args.rounds):
            rates["base"].append(asyncio.run(_round(server.target, base, args.new_tokens)))
            rates["mixed"].append(asyncio.run(_round(server.target, mixed, args.new_tokens)))
    finally:
        server.stop()
    a, b = statistics.median(rates["base"]), statistics.median(rates["mixed"])

    def show(xs: list[float]) -> str:
        return ", ".join(f"{x:.1f}" for x in xs)

    n, tokens = args.concurrency, args.new_tokens
    print(f"{n} concurrent greedy requests of {tokens} tokens; medians of {args.rounds} rounds")
    print(f"  (a) base model only             {a:8.1f} tokens/s   rounds: {show(rates['base'])}")
    print(f"  (b) {len(names)} distinct modules mixed   {b:8.1f} tokens/s   rounds: {show(rates['mixed'])}")
    print(f"  b/a = {b / a:.3f}")


if __name__ == "__main__":
    main()
