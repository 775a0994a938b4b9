"""Check a published module through a running server against the trained PEFT model.

The same held-out prompts go to the server's Score (over the same choices) and greedy Generate
(with the same token limit) that evaluate.py computed locally on the PEFT model; every answer must
agree. A disagreement means the served module is not the trained one (wrong files, wrong base
model, a bug in how the server applies it), which is why publishing reports it and refuses to move
an alias.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from plugboard_tuning.data import Example
from plugboard_tuning.evaluate import Evaluation

__all__ = ["Agreement", "check_served"]


@dataclass
class Agreement:
    examples: int
    score_agree: int | None  # None when there were no choices to score
    generate_agree: int
    seconds: float
    mismatches: list[dict[str, Any]] = field(default_factory=list)  # the first few, for the report

    @property
    def ok(self) -> bool:
        return self.generate_agree == self.examples and self.score_agree in (None, self.examples)

    def summary(self) -> str:
        def pct(n: int) -> str:
            return f"{n}/{self.examples} ({100.0 * n / max(1, self.examples):.1f}%)"

        parts = [f"generate {pct(self.generate_agree)}"]
        if self.score_agree is not None:
            parts.insert(0, f"score {pct(self.score_agree)}")
        return "served vs trained agreement: " + ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "score_agree": self.score_agree,
            "generate_agree": self.generate_agree,
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "mismatches": self.mismatches,
        }


def check_served(
    client: Any,
    ref: str,
    examples: Sequence[Example],
    trained: Evaluation,
    *,
    choices: Sequence[str] = (),
    workers: int = 8,
    keep_mismatches: int = 5,
    on_done: Callable[[int], None] | None = None,
) -> Agreement:
    """Ask the server (a plugboard_client.Client) for `ref`'s answers and compare with `trained`.

    Requests run `workers` at a time so that the server batches them, as it would real traffic.
    """
    if len(examples) != len(trained.predictions):
        raise ValueError("the evaluation does not cover these examples")
    start = time.perf_counter()

    def ask(i: int) -> tuple[str | None, str]:
        ex, want = examples[i], trained.predictions[i]
        best = None
        if choices:
            best = client.score(ex.prompt, choices=list(choices), adapter=ref).best
        text = client.generate(
            ex.prompt, adapter=ref, max_new_tokens=want.max_new_tokens, temperature=0.0
        ).text
        return best, text

    score_agree = 0 if choices else None
    generate_agree = 0
    mismatches: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, (best, text) in enumerate(pool.map(ask, range(len(examples)))):
            want = trained.predictions[i]
            score_ok = best == want.choice
            generate_ok = text == want.generated
            if score_agree is not None:
                score_agree += score_ok
            generate_agree += generate_ok
            if not (score_ok and generate_ok) and len(mismatches) < keep_mismatches:
                mismatches.append(
                    {
                        "prompt": examples[i].prompt,
                        "served": {"choice": best, "text": text},
                        "trained": {"choice": want.choice, "text": want.generated},
                    }
                )
            if on_done is not None:
                on_done(1)
    return Agreement(len(examples), score_agree, generate_agree, time.perf_counter() - start, mismatches)
