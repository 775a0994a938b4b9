"""(b) plugboard vs transformers' own `generate` on one padded batch, side by side in one run.

    python -m benchmarks.compare_hf --n 32 --new-tokens 64 --rounds 3

The peer is naive serving at its practical best: the same N prompts in ONE left-padded batch (with
its attention mask) through `model.generate` of the same base model, in this process, with the same
dtype and device. plugboard serves the same N prompts as N concurrent requests (an in-process server,
AsyncClient). Both greedy, EOS ignored (ignore_eos; eos_token_id=None), so every output length is
exact. Throughput = useful output tokens / wall time. Two cases:

  equal    every request wants new_tokens tokens (target plugboard/HF >= 0.90)
  varying  lengths drawn from [new_tokens/8, 2*new_tokens] with a fixed seed: HF generates to the
           longest of its batch, plugboard frees each row when it is done (target > 1.0)

After an untimed warm-up, rounds alternate plugboard and HF; medians, and plugboard / HF (> 1 means
plugboard is faster). Also checked: with equal lengths, plugboard's greedy tokens equal HF's for
each prompt (exact in float32; bfloat16 on a GPU may flip near-ties between differently shaped batches).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from benchmarks.common import base_model_dir, serve
from plugboard_client import AsyncClient
from plugboard_server.models.loading import load_model

TOPICS = (
    "a robot who learns to paint",
    "the lighthouse keeper's last winter on an island far out in the northern sea",
    "two rival bakers",
    "a map that redraws itself every night, and the cartographer who tries to stop it",
    "a cat who runs a library",
    "the first city on Mars, told by the engineer who designed its water system",
    "a lost umbrella",
    "a chess match between an old champion and a machine that refuses to win",
)
EQUAL_TARGET = 0.90  # plugboard / HF, every request the same length
VARYING_TARGET = 1.0  # plugboard / HF, lengths drawn 8..128 (strictly greater)


def prompts(n: int) -> list[str]:
    """n distinct prompts of different lengths (so the padded batch really is padded)."""
    return [f"Write a short story about {TOPICS[i % len(TOPICS)]}. Chapter {i + 1}:" for i in range(n)]


def varying_lengths(n: int, new_tokens: int, seed: int = 0) -> list[int]:
    """n output lengths drawn uniformly from [max(1, new_tokens // 8), 2 * new_tokens]: 8..128 for 64."""
    rng = random.Random(seed)
    return [rng.randint(max(1, new_tokens // 8), 2 * new_tokens) for _ in range(n)]


# A plugboard job: (prompt, adapter ("" = the base model), max_new_tokens).
Job = tuple[str, str, int]


async def _plugboard(target: str, jobs: Sequence[Job], logprobs: bool) -> tuple[float, list[list[int]]]:
    async with AsyncClient(target, timeout=3600) as c:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(
                c.generate(p, adapter=a, max_new_tokens=k, ignore_eos=True, logprobs=logprobs)
                for p, a, k in jobs
            )
        )
        elapsed = time.perf_counter() - start
    for r, (_, _, k) in zip(results, jobs, strict=True):
        assert r.generated_tokens == k, f"asked for {k} tokens, got {r.generated_tokens}"
    return elapsed, [[lp.token_id for lp in r.logprobs] for r in results]


def plugboard_round(target: str, jobs: Sequence[Job], *, logprobs: bool = False) -> tuple[float, list]:
    """All jobs as concurrent requests: (wall seconds, each one's token ids when `logprobs`, else [])."""
    return asyncio.run(_plugboard(target, jobs, logprobs))


async def _token_ids(target: str, texts: Sequence[str]) -> list[list[int]]:
    async with AsyncClient(target, timeout=600) as c:
        return [list((await c.tokenize(t)).token_ids) for t in texts]


def token_ids(target: str, texts: Sequence[str]) -> list[list[int]]:
    """The prompts as the server tokenises them: the peer gets exactly the same input ids."""
    return asyncio.run(_token_ids(target, texts))


def pad_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def hf_generate(
    model: Any, rows: Sequence[Sequence[int]], new_tokens: int, pad: int, **kwargs: Any
) -> tuple[float, list[list[int]]]:
    """One left-padded batch through `model.generate`, greedy, EOS ignored: (seconds, new token ids)."""
    width = max(len(r) for r in rows)
    device = next(model.parameters()).device
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,  # ignore EOS: exact lengths, as plugboard's ignore_eos
            pad_token_id=pad,
            **kwargs,
        )
        new = out[:, -new_tokens:].tolist()  # .tolist() waits for the device
    elapsed = time.perf_counter() - start
    assert out.shape[1] >= width + new_tokens, f"generate stopped early: {out.shape[1] - width} tokens"
    return elapsed, new


def first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    """The first step at which two token sequences differ (the shorter length if one is a prefix)."""
    return next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def case(name: str, plugboard: list[float], peer: list[float], target: float, strict: bool = False) -> dict:
    """One side-by-side figure from each side's per-round throughputs (medians)."""
    a, b = statistics.median(plugboard), statistics.median(peer)
    ratio = a / b
    return {
        "name": name,
        "plugboard_tokens_per_s": a,
        "peer_tokens_per_s": b,
        "rounds": {"plugboard": plugboard, "peer": peer},
        "ratio": ratio,
        "target": f"{'>' if strict else '>='} {target:g}",
        "holds": ratio > target if strict else ratio >= target,
    }


def measure(sides: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each side's throughput per round, the sides run one after another within every round."""
    rates: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(rounds):
        for k, f in sides.items():
            rates[k].append(f())
    return rates


def run(model: str = "default", n: int = 32, new_tokens: int = 64, rounds: int = 3, seed: int = 0) -> dict:
    if n < 1 or new_tokens < 1 or rounds < 1:
        raise ValueError("n, new_tokens and rounds must be at least 1")
    base_dir = base_model_dir(model)
    texts = prompts(n)
    lengths = varying_lengths(n, new_tokens, seed)
    served = load_model(str(base_dir))
    peer = load_model(str(base_dir))  # its own copy: plugboard wraps layers of the model it serves
    pad = pad_id(peer.tokenizer)
    budget = n * (max(len(peer.tokenizer.encode(t)) for t in texts) + 8 + max([*lengths, new_tokens]))
    with serve(served, max_batch_size=max(n, 1), max_batch_tokens=max(budget, 65536)) as server:
        rows = token_ids(server.target, texts)
        equal: list[Job] = [(t, "", new_tokens) for t in texts]
        varying: list[Job] = [(t, "", k) for t, k in zip(texts, lengths, strict=True)]
        # Warm-up (untimed): plugboard at full length with token ids, for the equality check below.
        _, ours = plugboard_round(server.target, equal, logprobs=True)
        hf_generate(peer.model, rows, min(new_tokens, 4), pad)
        hf_tokens: list[list[int]] = []

        def hf_equal() -> float:
            seconds, tokens = hf_generate(peer.model, rows, new_tokens, pad)
            hf_tokens[:] = tokens
            return n * new_tokens / seconds

        def hf_varying() -> float:
            seconds, _ = hf_generate(peer.model, rows, max(lengths), pad)  # to the longest in the batch
            return sum(lengths) / seconds

        rates = measure(
            {
                "plugboard_equal": lambda: n * new_tokens / plugboard_round(server.target, equal)[0],
                "hf_equal": hf_equal,
                "plugboard_varying": lambda: sum(lengths) / plugboard_round(server.target, varying)[0],
                "hf_varying": hf_varying,
            },
            rounds,
        )
    matches = sum(a == b for a, b in zip(ours, hf_tokens, strict=True))
    diverge = [first_difference(a, b) for a, b in zip(ours, hf_tokens, strict=True) if a != b]
    cases = {
        "equal": case(
            f"equal lengths ({new_tokens} each)", rates["plugboard_equal"], rates["hf_equal"], EQUAL_TARGET
        ),
        "varying": case(
            f"varying lengths ({min(lengths)}..{max(lengths)})",
            rates["plugboard_varying"],
            rates["hf_varying"],
            VARYING_TARGET,
            strict=True,
        ),
    }
    cases["varying"]["lengths"] = lengths
    cases["varying"]["padding_waste"] = 1 - sum(lengths) / (n * max(lengths))  # HF's generated-but-unused
    return {
        "name": "(b) plugboard vs transformers generate (one padded batch)",
        "peer": "transformers generate",
        "n": n,
        "new_tokens": new_tokens,
        "dtype": str(peer.dtype).removeprefix("torch."),
        "device": str(peer.device),
        "cases": cases,
        "tokens_match": matches,
        "tokens_compared": n,
        "first_divergence": diverge,  # the step at which each mismatching row first differs
        "holds": all(c["holds"] for c in cases.values()),
    }


def print_table(result: dict, rounds: int) -> None:
    """The figures of a comparison's run() as a small table."""
    print(
        f"{result['name']}: {result['n']} requests, {result['dtype']} on {result['device']}, "
        f"medians of {rounds} rounds"
    )
    print(f"  {'case':<40}{'plugboard tok/s':>16}{'peer tok/s':>12}{'ratio':>8}  {'target':<8}holds")
    for c in result["cases"].values():
        print(
            f"  {c['name']:<40}{c['plugboard_tokens_per_s']:>16.1f}{c['peer_tokens_per_s']:>12.1f}"
            f"{c['ratio']:>8.3f}  {c['target']:<8}{'yes' if c['holds'] else 'NO'}"
        )
    print(f"  ratio = plugboard / {result['peer']} (> 1: plugboard faster)")


def quiet() -> None:
    """No progress bars or generation-config chatter from transformers in the printed table."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # PEFT 0.21 calls a transformers 5 method that now warns about its rename (as in pyproject's pytest).
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default', 'tiny' or a model directory")
    p.add_argument("--n", type=int, default=32, help="requests (HF: rows of its one batch)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="of the varying output lengths")
    a = p.parse_args()
    quiet()
    r = run(a.model, a.n, a.new_tokens, a.rounds, a.seed)
    print_table(r, a.rounds)
    note = (
        ""
        if not r["first_divergence"]
        else f"; mismatching rows first differ at steps {r['first_divergence']}"
    )
    print(f"  greedy tokens equal to HF's (equal lengths): {r['tokens_match']}/{r['tokens_compared']}{note}")


if __name__ == "__main__":
    main()
