"""Score requests: a queued job (one forward over prompt + choice rows) and the result from its logprobs."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from plugboard_server.adapters.manager import Resident
from plugboard_server.adapters.types import AdapterWeights
from plugboard_server.engine.types import ChoiceScore, ScoreResult


@dataclass
class ScoreJob:
    request_id: str
    pairs: list[tuple[list[int], list[int]]]  # (prompt ids, choice ids) per row
    future: asyncio.Future[list[float]]
    adapter: str = ""  # "name@version"
    module: AdapterWeights | None = None
    resident: Resident | None = None  # the module's slot while the job runs
    result: list[float] | BaseException | None = None

    @property
    def padded_tokens(self) -> int:
        return len(self.pairs) * max(len(p) + len(c) for p, c in self.pairs)


def score_result(
    choices: tuple[str, ...],
    choice_ids: list[list[int]],
    logprobs: list[float],
    adapter: str,
    prompt_tokens: int,
    request_id: str,
) -> ScoreResult:
    """Sum logprobs per choice -> probabilities normalised over the choices (a stable softmax)."""
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    scores = tuple(
        ChoiceScore(choice=c, logprob=lp, probability=w / total, tokens=len(ids))
        for c, lp, w, ids in zip(choices, logprobs, weights, choice_ids, strict=True)
    )
    best = max(scores, key=lambda s: s.logprob).choice
    return ScoreResult(scores, best, adapter=adapter, prompt_tokens=prompt_tokens, request_id=request_id)
