"""Left-padded batches: joining, leaving and padding never change a row's logits."""

from __future__ import annotations

import torch

from plugboard_server.engine.batch import Batch
from plugboard_server.engine.runner import ModelRunner

PROMPTS = ["The quick brown fox", "What is the capital of France? The capital", "Café 🙂"]


def _ids(model, text: str) -> list[int]:
    return model.tokenizer.encode(text, add_special_tokens=False)


def _greedy_alone(runner: ModelRunner, ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    batch, logits = runner.prefill([ids], ["r"])
    tokens, all_logits = [], []
    for _ in range(steps):
        all_logits.append(logits[0])
        batch.next_ids = logits.argmax(-1)
        tokens.append(int(batch.next_ids[0]))
        logits = runner.decode(batch)
    return tokens, all_logits


def test_prefill_matches_transformers_generate(tiny_model):
    runner = ModelRunner(tiny_model)
    ids = _ids(tiny_model, PROMPTS[0])
    tokens, _ = _greedy_alone(runner, ids, 10)
    ref = tiny_model.model.generate(
        torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None
    )
    assert tokens == ref[0, len(ids) :].tolist()


def test_a_row_joining_at_any_step_gets_the_same_logits_as_alone(tiny_model):
    runner = ModelRunner(tiny_model)
    row_ids = _ids(tiny_model, PROMPTS[2])
    ref_tokens, ref_logits = _greedy_alone(runner, row_ids, 8)
    for join_step in range(5):
        running, logits = runner.prefill([_ids(tiny_model, p) for p in PROMPTS[:2]], ["a", "b"])
        for _ in range(join_step):
            running.next_ids = logits.argmax(-1)
            logits = runner.decode(running)
        running.next_ids = logits.argmax(-1)
        joined, row_logits = runner.prefill([row_ids], ["r"])
        joined.next_ids = row_logits.argmax(-1)
        tokens, seen = [int(joined.next_ids[0])], [row_logits[0]]
        batch = Batch.concatenate([running, joined])
        for step in range(7):
            if step == 3:
                batch.filter([2])  # the two older rows leave; their padding goes with them
                assert batch.cache_len == len(row_ids) + step
            logits = runner.decode(batch)
            batch.next_ids = logits.argmax(-1)
            seen.append(logits[-1])
            tokens.append(int(batch.next_ids[-1]))
        assert tokens == ref_tokens, f"joined at step {join_step}"
        for a, b in zip(seen, ref_logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_filter_keeps_rows_in_the_given_order(tiny_model):
    runner = ModelRunner(tiny_model)
    batch, _ = runner.prefill([_ids(tiny_model, p) for p in PROMPTS], ["a", "b", "c"])
    batch.filter([2, 0])
    assert batch.rows == ["c", "a"]
    assert batch.attention_mask.shape[0] == 2
    assert all(layer.keys.shape[0] == 2 for layer in batch.cache.layers)
