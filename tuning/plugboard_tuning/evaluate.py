"""Evaluate a model (the base model, or a trained PEFT module on it) on held-out examples.

Two figures, computed the way the server computes them so that a published module can be checked
against its training-time figures:

- accuracy (labelled data only): each example's label words are scored as continuations of the
  prompt, exactly as the Score RPC does (prompt and choice tokenised apart, without special tokens;
  a choice's log-likelihood is the sum over its tokens); the best-scoring word is the prediction.
- exact match: greedy decoding, as the Generate RPC does with temperature 0, for at most as many
  tokens as the target has plus one (room for the end-of-sequence token), cut at an EOS token; a
  match is a generated text equal to the target once surrounding whitespace is stripped.

Batches are right-padded and run without a KV cache: the positions of real tokens are then those of
an unpadded run, for every PEFT method, and the few decoding steps a label needs are cheap.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from plugboard_tuning.data import Example
from plugboard_tuning.train import pad_right

__all__ = ["Evaluation", "Prediction", "evaluate", "label_choices"]


@dataclass(frozen=True)
class Prediction:
    """What the model answered for one example."""

    choice: str | None  # the best-scoring label word (with its separator); None for unlabelled data
    generated: str  # the greedy continuation, without the EOS token
    generated_ids: tuple[int, ...]
    max_new_tokens: int  # the decoding limit used: the target's tokens + 1


@dataclass
class Evaluation:
    examples: int
    accuracy: float | None  # None when the examples carry no labels
    exact_match: float
    seconds: float
    predictions: list[Prediction]

    def figures(self) -> dict[str, float]:
        """The figures by name, as reports and --promote-if use them."""
        out = {"exact_match": self.exact_match}
        if self.accuracy is not None:
            out["accuracy"] = self.accuracy
        return out


def label_choices(examples: Sequence[Example]) -> list[str]:
    """The distinct targets of labelled examples, in label order: what accuracy chooses between.

    Empty when any example has no label (free-form input/output data has no accuracy).
    """
    if not examples or any(ex.label is None for ex in examples):
        return []
    by_label = {ex.label: ex.target for ex in examples}
    return [by_label[label] for label in sorted(by_label, key=str)]


@torch.no_grad()
def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    eos_token_ids: Sequence[int],
    choices: Sequence[str] | None = None,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> Evaluation:
    """Accuracy over `choices` (default label_choices(examples)) and exact match of greedy text.

    on_batch(n) is called after each batch of n examples, for progress bars.
    """
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    choices = list(label_choices(examples) if choices is None else choices)
    if len(choices) == 1:
        choices = []  # one choice is no choice: accuracy would be 1.0 whatever the model does
    choice_ids = [_encode(tokenizer, c) for c in choices]
    eos = frozenset(eos_token_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    prompts = [_encode(tokenizer, ex.prompt) for ex in examples]
    limits = [len(_encode(tokenizer, ex.target)) + 1 for ex in examples]
    picked: list[int | None] = [None] * len(examples)
    generated: list[list[int]] = [[] for _ in examples]
    # Similar lengths together: less padding, and fewer logits to keep per batch.
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))
    try:
        for first in range(0, len(order), batch_size):
            batch = order[first : first + batch_size]
            pending = batch
            if choice_ids:
                pending = []
                for i, (best, greedy, done) in zip(
                    batch, _score(model, [prompts[i] for i in batch], choice_ids, eos, pad_id), strict=True
                ):
                    picked[i], generated[i] = best, greedy[: limits[i]]
                    if not done and len(generated[i]) < limits[i]:
                        pending.append(i)
            _greedy(model, prompts, generated, pending, limits, eos, pad_id)
            if on_batch is not None:
                on_batch(len(batch))
    finally:
        model.train(was_training)

    predictions = [
        Prediction(
            None if p is None else choices[p],
            # As the server's detokenizer writes text.
            tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False),
            tuple(ids),
            limit,
        )
        for p, ids, limit in zip(picked, generated, limits, strict=True)
    ]
    n = max(1, len(examples))
    matches = sum(
        p.generated.strip() == ex.target.strip() for p, ex in zip(predictions, examples, strict=True)
    )
    accuracy = None
    if choices:
        accuracy = sum(p.choice == ex.target for p, ex in zip(predictions, examples, strict=True)) / n
    return Evaluation(len(examples), accuracy, matches / n, time.perf_counter() - start, predictions)


def _encode(tokenizer: Any, text: str) -> list[int]:
    # As the server encodes prompts and choices: no BOS or other special tokens added.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _log_probs(model: Any, rows: Sequence[list[int]], keep: int, pad_id: int) -> torch.Tensor:
    """Float32 log-probabilities [rows, keep, vocab] at the last `keep` positions of right-padded rows.

    Only those positions go through the LM head: a full [rows, width, vocab] tensor would be
    gigabytes for a 50k vocabulary.
    """
    device = next(model.parameters()).device
    ids, mask = pad_right(rows, pad_id)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep).logits
    # Prompt tuning's virtual tokens come first, so the last positions are the rows' own either way.
    return torch.log_softmax(logits[:, -keep:].float(), dim=-1).cpu()


def _score(
    model: Any,
    prompts: Sequence[list[int]],
    choice_ids: Sequence[list[int]],
    eos: frozenset[int],
    pad_id: int,
) -> list[tuple[int, list[int], bool]]:
    """Per prompt: (index of the best choice, greedy tokens read off the same forward, EOS reached).

    One forward over prompt + choice rows gives each choice's log-likelihood. It also holds the
    greedy continuation for as long as that follows some choice's tokens: the logits after
    prompt + choice[:k] are in that choice's row. Only a continuation that leaves every choice
    needs more decoding steps.
    """
    rows = [p + c for p in prompts for c in choice_ids]
    width = max(len(r) for r in rows)
    keep = width - min(len(p) for p in prompts) + 1
    logprobs = _log_probs(model, rows, keep, pad_id)
    k = len(choice_ids)
    out = []
    for i, p in enumerate(prompts):

        def at(j: int, t: int, i: int = i, p: list[int] = p) -> torch.Tensor:
            # Log-probabilities after prompt + choice j's first t tokens.
            return logprobs[i * k + j, len(p) - 1 + t - (width - keep)]

        totals = [sum(float(at(j, t)[c[t]]) for t in range(len(c))) for j, c in enumerate(choice_ids)]
        best = max(range(k), key=totals.__getitem__)
        greedy: list[int] = []
        done = False
        while not done:
            t = len(greedy)
            row = next((j for j, c in enumerate(choice_ids) if len(c) >= t and c[:t] == greedy), None)
            if row is None:
                break
            token = int(at(row, t).argmax())
            if token in eos:
                done = True
            else:
                greedy.append(token)  # may pass the caller's limit; the caller cuts it
        out.append((best, greedy, done))
    return out


def _greedy(
    model: Any,
    prompts: Sequence[list[int]],
    generated: list[list[int]],
    pending: Sequence[int],
    limits: Sequence[int],
    eos: frozenset[int],
    pad_id: int,
) -> None:
    """Extend generated[i] for each pending i greedily, up to limits[i] or an EOS token (not kept)."""
    live = [i for i in pending if len(generated[i]) < limits[i]]
    while live:
        rows = [prompts[i] + generated[i] for i in live]
        logprobs = _log_probs(model, rows, max(len(r) for r in rows) - min(len(r) for r in rows) + 1, pad_id)
        width = max(len(r) for r in rows)
        still = []
        for r, i in enumerate(live):
            token = int(logprobs[r, len(rows[r]) - 1 - (width - logprobs.shape[1])].argmax())
            if token in eos:
                continue
            generated[i].append(token)
            if len(generated[i]) < limits[i]:
                still.append(i)
        live = still
