from __future__ import annotations

import torch

from plugboard_server.engine.sampling import SamplingRow, sample
from plugboard_server.engine.types import SamplingParams


def _row(seed: int = 0, **kw) -> SamplingRow:
    params = SamplingParams(**kw)
    gen = None
    if not params.greedy:
        gen = torch.Generator().manual_seed(seed)
    return SamplingRow(params=params, generator=gen, seen_ids=[])


def test_greedy_rows_take_the_argmax_and_logprobs_are_the_models():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    tokens, lp = sample(logits, [_row(logprobs=True), _row(), _row()])
    assert tokens.tolist() == logits.argmax(-1).tolist()
    assert lp is not None
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1))


def test_top_k_1_and_a_tiny_top_p_are_greedy():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    rows = [_row(seed=i, temperature=1.5, top_k=1) for i in range(2)]
    rows += [_row(seed=i, temperature=1.5, top_p=1e-6) for i in range(2)]
    tokens, _ = sample(logits, rows)
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1, 0.0])
    logits = probs.log().repeat(2000, 1)
    rows = [_row(seed=i, temperature=1.0) for i in range(2000)]
    tokens, _ = sample(logits, rows)
    freq = torch.bincount(tokens, minlength=4).float() / 2000
    assert freq[3] == 0  # zero probability is never drawn
    torch.testing.assert_close(freq, probs, atol=0.04, rtol=0)


def test_top_k_and_top_p_cut_the_tail():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(500, 1)
    tokens, _ = sample(logits, [_row(seed=i, temperature=1.0, top_k=2) for i in range(500)])
    assert set(tokens.tolist()) == {0, 1}
    # p(0) = 0.64, p(1) = 0.24: top_p 0.8 keeps exactly those two.
    tokens, _ = sample(logits, [_row(seed=i, temperature=1.0, top_p=0.8) for i in range(500)])
    assert set(tokens.tolist()) == {0, 1}


def test_a_row_draws_the_same_token_whatever_its_neighbours():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(2))
    alone, _ = sample(logits, [_row(seed=42, temperature=1.0)])
    crowd = torch.cat([torch.randn(5, 100), logits])
    batched, _ = sample(
        crowd, [_row(seed=i, temperature=0.7) for i in range(5)] + [_row(seed=42, temperature=1.0)]
    )
    assert batched[-1] == alone[0]


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    row = _row(repetition_penalty=2.0)
    row.seen_ids.extend([0])
    tokens, _ = sample(logits, [row])
    assert tokens.tolist() == [1]
