"""Choose the next token of every row at once, each row with its own parameters and seeded generator.

Reproducibility: a sampled row draws exactly one uniform number per step from its own generator
and picks the token by inverse CDF, so a seeded request gives the same tokens alone or in any batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from plugboard_server.engine.types import SamplingParams


@dataclass
class SamplingRow:
    params: SamplingParams
    generator: torch.Generator | None  # None for greedy rows
    seen_ids: list[int]  # prompt + generated, for the repetition penalty


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [B, V] -> (next token ids [B], their log-probabilities [B] or None if no row asked).

    Log-probabilities are under the model's own distribution (before penalty, temperature, top-k/p).
    """
    logits = logits.float()
    want_logprobs = any(r.params.logprobs for r in rows)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None

    penalised = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if penalised:
        logits = logits.clone()
        for i in penalised:
            _apply_repetition_penalty(logits[i], rows[i].seen_ids, rows[i].params.repetition_penalty)

    tokens = torch.argmax(logits, dim=-1)
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        tokens[sampled] = _sample_rows(logits[sampled], [rows[i] for i in sampled])

    chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1) if raw_logprobs is not None else None
    return tokens, chosen


def _apply_repetition_penalty(row_logits: torch.Tensor, seen_ids: list[int], penalty: float) -> None:
    # As in transformers' RepetitionPenaltyLogitsProcessor: divide positive logits, multiply negative.
    ids = torch.tensor(sorted(set(seen_ids)), dtype=torch.long, device=row_logits.device)
    scores = row_logits[ids]
    row_logits[ids] = torch.where(scores > 0, scores / penalty, scores * penalty)


def _sample_rows(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """logits [S, V] of sampled rows -> token ids [S]."""
    device = logits.device
    temps = torch.tensor([r.params.temperature for r in rows], device=device)
    logits = logits / temps[:, None]
    top_k = [r.params.top_k for r in rows]
    top_p = [r.params.top_p for r in rows]

    if any(k > 0 for k in top_k):
        vocab = logits.shape[-1]
        ks = torch.tensor([min(k, vocab) if k > 0 else vocab for k in top_k], device=device)
        kth = torch.topk(logits, int(ks.max()), dim=-1).values.gather(1, (ks - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))

    if any(p < 1.0 for p in top_p):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        before = probs.cumsum(dim=-1) - probs
        ps = torch.tensor(top_p, device=device)[:, None]
        drop_sorted = before >= ps
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))

    probs = torch.softmax(logits, dim=-1)
    cdf = probs.cumsum(dim=-1)
    u = torch.stack([torch.rand((), generator=r.generator) for r in rows]).to(device)
    # right=True: the first token whose cdf exceeds u * total; a zero-probability token never wins.
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
    # Rounding can put u * total at total itself: fall back to the last token with any probability,
    # which is where the cdf first reaches its maximum.
    return torch.where(idx >= logits.shape[-1], cdf.argmax(dim=-1), idx)
