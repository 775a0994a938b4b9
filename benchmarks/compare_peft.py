"""(c) plugboard vs PEFT in-process, on the same base model and the same module files, in one run.

    python -m benchmarks.compare_peft --n 32 --adapters 32 --new-tokens 64 --rounds 3

N greedy requests (EOS ignored: every one exactly new_tokens tokens), row i using module i % K. The
modules come from common.make_modules (random weights: speed, not quality): K LoRA modules and K
prefix-tuning modules, served by plugboard from one adapters_dir and loaded into PEFT from the same
directories (PeftModel.from_pretrained, then load_adapter). plugboard always serves the N requests
concurrently, every row with its own module. Each PEFT peer is the best PEFT offers for its case:

  1. mixed LoRA     one batched generate with adapter_names=[...] per row (PEFT's mixed-batch
                    inference), left-padded                                         target >= 1.0
  2. naive serving  per request set_adapter(name) + generate, one request at a time  target >= 10
  3. prefixes       PEFT cannot mix prompt-learning adapters in one batch (generate refuses
                    adapter_names for them), so the rows are grouped by module and each group is
                    one left-padded batch, the groups one after another              target >= 4

Cases 1 and 2 share plugboard's LoRA figure (the same requests, measured once per round). After an
untimed warm-up, rounds alternate plugboard and PEFT; medians, ratio plugboard / PEFT (> 1: plugboard
faster). Also reported: how many rows give PEFT's greedy tokens (cases 1 and 3).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import CACHE, base_model_dir, make_modules, serve
from benchmarks.compare_hf import (
    Job,
    case,
    hf_generate,
    measure,
    pad_id,
    plugboard_round,
    print_table,
    prompts,
    quiet,
    token_ids,
)
from plugboard_server.models.loading import load_model

MIXED_TARGET = 1.0
SEQUENTIAL_TARGET = 10.0
GROUPED_TARGET = 4.0


def peft_model(base_dir: Path, modules: list[Path]):
    """A PeftModel on its own copy of the base model, with every module of `modules` loaded."""
    from peft import PeftModel

    base = load_model(str(base_dir))  # same loader, dtype and device as the served model
    model = PeftModel.from_pretrained(base.model, str(modules[0]), adapter_name=modules[0].name)
    for path in modules[1:]:
        model.load_adapter(str(path), adapter_name=path.name)
    model.eval()
    return model


def run(
    model: str = "default",
    n: int = 32,
    new_tokens: int = 64,
    rounds: int = 3,
    adapters: int = 32,
    virtual_tokens: int = 16,
    lora_rank: int = 8,
) -> dict:
    if min(n, new_tokens, rounds, adapters) < 1:
        raise ValueError("n, new_tokens, rounds and adapters must be at least 1")
    base_dir = base_model_dir(model)
    # The server imports every subdirectory: one directory per set of modules.
    adapters_dir = CACHE / "compare-peft" / f"{base_dir.name}-k{adapters}-t{virtual_tokens}-r{lora_rank}"
    loras = make_modules(base_dir, adapters_dir, adapters, kinds=("lora",), rank=lora_rank)
    prefixes = make_modules(base_dir, adapters_dir, adapters, kinds=("prefix",), tokens=virtual_tokens)
    texts = prompts(n)
    lora_of = [loras[i % adapters].name for i in range(n)]
    prefix_of = [prefixes[i % adapters].name for i in range(n)]
    groups = [[i for i in range(n) if i % adapters == k] for k in range(adapters)]
    served = load_model(str(base_dir))
    lora_peft = peft_model(base_dir, loras)
    prefix_peft = peft_model(base_dir, prefixes)
    pad = pad_id(served.tokenizer)
    with serve(
        served,
        adapters_dir=adapters_dir,
        max_batch_size=max(n, 1),
        max_loaded_adapters=2 * adapters,  # every module keeps its device slot: no eviction in the runs
        max_lora_rank=max(lora_rank, 8),
        max_prefix_tokens=max(virtual_tokens, 128),
    ) as server:
        rows = token_ids(server.target, texts)
        lora_jobs: list[Job] = [(t, a, new_tokens) for t, a in zip(texts, lora_of, strict=True)]
        prefix_jobs: list[Job] = [(t, a, new_tokens) for t, a in zip(texts, prefix_of, strict=True)]
        # Warm-up (untimed): every module read and given a slot; plugboard's tokens for the check.
        _, ours_lora = plugboard_round(server.target, lora_jobs, logprobs=True)
        _, ours_prefix = plugboard_round(server.target, prefix_jobs, logprobs=True)
        hf_generate(lora_peft, rows, min(new_tokens, 4), pad, adapter_names=lora_of)
        for peer, name in ((lora_peft, loras[0].name), (prefix_peft, prefixes[0].name)):
            peer.set_adapter(name)
            hf_generate(peer, rows[:1], min(new_tokens, 4), pad)
        peft_lora: list[list[int]] = []
        peft_prefix: list[list[int]] = [[] for _ in range(n)]

        def peft_mixed() -> float:
            seconds, tokens = hf_generate(lora_peft, rows, new_tokens, pad, adapter_names=lora_of)
            peft_lora[:] = tokens
            return n * new_tokens / seconds

        def peft_sequential() -> float:
            start = time.perf_counter()  # the whole loop, set_adapter included: it is part of serving
            for row, name in zip(rows, lora_of, strict=True):
                lora_peft.set_adapter(name)
                hf_generate(lora_peft, [row], new_tokens, pad)
            return n * new_tokens / (time.perf_counter() - start)

        def peft_grouped() -> float:
            start = time.perf_counter()
            for k, members in enumerate(groups):
                if not members:
                    continue
                prefix_peft.set_adapter(prefixes[k].name)
                _, tokens = hf_generate(prefix_peft, [rows[i] for i in members], new_tokens, pad)
                for i, t in zip(members, tokens, strict=True):
                    peft_prefix[i] = t
            return n * new_tokens / (time.perf_counter() - start)

        useful = n * new_tokens  # output tokens per round, every one asked for
        rates = measure(
            {
                "plugboard_lora": lambda: useful / plugboard_round(server.target, lora_jobs)[0],
                "peft_mixed": peft_mixed,
                "peft_sequential": peft_sequential,
                "plugboard_prefix": lambda: useful / plugboard_round(server.target, prefix_jobs)[0],
                "peft_grouped": peft_grouped,
            },
            rounds,
        )
    cases = {
        "mixed_lora": case(
            f"1. mixed LoRA batch ({adapters} adapters)",
            rates["plugboard_lora"],
            rates["peft_mixed"],
            MIXED_TARGET,
        ),
        "sequential": case(
            "2. naive: one request at a time",
            rates["plugboard_lora"],
            rates["peft_sequential"],
            SEQUENTIAL_TARGET,
        ),
        "grouped_prefix": case(
            f"3. prefixes, one batch per adapter ({adapters})",
            rates["plugboard_prefix"],
            rates["peft_grouped"],
            GROUPED_TARGET,
        ),
    }
    return {
        "name": "(c) plugboard vs PEFT",
        "peer": "PEFT",
        "n": n,
        "new_tokens": new_tokens,
        "adapters": adapters,
        "dtype": str(served.dtype).removeprefix("torch."),
        "device": str(served.device),
        "cases": cases,
        "tokens_match": {
            "mixed_lora": sum(a == b for a, b in zip(ours_lora, peft_lora, strict=True)),
            "grouped_prefix": sum(a == b for a, b in zip(ours_prefix, peft_prefix, strict=True)),
        },
        "tokens_compared": n,
        "holds": all(c["holds"] for c in cases.values()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default', 'tiny' or a model directory")
    p.add_argument("--n", type=int, default=32, help="requests (rows)")
    p.add_argument("--adapters", type=int, default=32, help="K: modules of each kind; row i uses i %% K")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--virtual-tokens", type=int, default=16, help="of each prefix")
    p.add_argument("--lora-rank", type=int, default=8)
    a = p.parse_args()
    quiet()
    r = run(a.model, a.n, a.new_tokens, a.rounds, a.adapters, a.virtual_tokens, a.lora_rank)
    print_table(r, a.rounds)
    m = r["tokens_match"]
    print(
        f"  greedy tokens equal to PEFT's: mixed LoRA {m['mixed_lora']}/{r['tokens_compared']}, "
        f"prefixes {m['grouped_prefix']}/{r['tokens_compared']}"
    )


if __name__ == "__main__":
    main()
