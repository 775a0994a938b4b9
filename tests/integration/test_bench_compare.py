"""Smoke runs of the side-by-side comparisons (b) vs transformers and (c) vs PEFT: tiny model, tiny sizes.

No timing is asserted (the tiny model measures overheads, not the targets); the full runs are
`python -m benchmarks.compare_hf` and `python -m benchmarks.compare_peft` on the default model.
"""

from __future__ import annotations

import pytest

from benchmarks import compare_hf, compare_peft


def _figures_are_positive(result: dict, cases: set[str]) -> None:
    assert set(result["cases"]) == cases
    for c in result["cases"].values():
        assert c["plugboard_tokens_per_s"] > 0 and c["peer_tokens_per_s"] > 0, c
        assert c["ratio"] > 0 and isinstance(c["holds"], bool) and c["target"], c
        assert len(c["rounds"]["plugboard"]) == len(c["rounds"]["peer"]) == 1


@pytest.mark.timeout(120)
def test_compare_hf_gives_figures_and_hf_greedy_tokens():
    r = compare_hf.run(model="tiny", n=4, new_tokens=4, rounds=1)
    _figures_are_positive(r, {"equal", "varying"})
    assert r["tokens_compared"] == 4 and r["tokens_match"] == 4, r["first_divergence"]
    lengths = r["cases"]["varying"]["lengths"]
    assert len(lengths) == 4 and all(1 <= k <= 8 for k in lengths)


@pytest.mark.timeout(120)
def test_compare_peft_gives_figures_for_the_three_cases():
    r = compare_peft.run(model="tiny", n=4, new_tokens=4, rounds=1, adapters=2, virtual_tokens=4, lora_rank=4)
    _figures_are_positive(r, {"mixed_lora", "sequential", "grouped_prefix"})
    assert r["tokens_compared"] == 4
    assert r["tokens_match"] == {"mixed_lora": 4, "grouped_prefix": 4}  # plugboard gives PEFT's tokens
