"""One request's life in the engine: its tokens, detokeniser, stop matcher, generator and events."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from plugboard_server.adapters.manager import Resident
from plugboard_server.adapters.types import AdapterWeights
from plugboard_server.engine.detokenize import IncrementalDetokenizer
from plugboard_server.engine.sampling import SamplingRow
from plugboard_server.engine.stops import StopMatcher
from plugboard_server.engine.types import (
    Finished,
    FinishReason,
    SamplingParams,
    Timing,
    TokenDelta,
    TokenLogprob,
)

Event = TokenDelta | Finished | Exception


@dataclass
class Clock:
    submitted: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    prefill_seconds: float = 0.0

    def timing(self) -> Timing:
        end = self.finished or time.monotonic()
        return Timing(
            queue_seconds=(self.admitted or end) - self.submitted,
            prefill_seconds=self.prefill_seconds,
            total_seconds=end - self.submitted,
            first_token_seconds=(self.first_token - self.submitted) if self.first_token else 0.0,
        )


class Sequence:
    """Mutated by the engine's step thread; its events are delivered on the event loop."""

    def __init__(
        self,
        *,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        seed: int,
        tokenizer: Any,
        eos_ids: frozenset[int],
        adapter: str = "",
        module: AdapterWeights | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.seed = seed
        self.adapter = adapter  # "name@version", "" for the base model
        self.module = module
        self.resident: Resident | None = None  # the module's slot, once admitted
        self.clock = Clock()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.generated: list[int] = []
        self.cancelled = False
        self.finish_reason: FinishReason | None = None
        self._tokenizer = tokenizer
        self._eos_ids = frozenset() if params.ignore_eos else eos_ids
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stops = StopMatcher(params.stop)
        generator = None
        if not params.greedy:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(seed)
        seen = list(prompt_ids) if params.repetition_penalty != 1.0 else []
        self.sampling = SamplingRow(params=params, generator=generator, seen_ids=seen)
        # Tokens generated since the last delta that carried text.
        self._pending_ids: list[int] = []
        self._pending_logprobs: list[TokenLogprob] = []

    @property
    def input_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def max_new_tokens(self) -> int:
        assert self.params.max_new_tokens is not None
        return self.params.max_new_tokens

    @property
    def input_width(self) -> int:
        """Tokens this row feeds the model at prefill: the prompt, and a soft prompt's virtual tokens."""
        soft = self.module is not None and self.module.prompt is not None
        return self.input_len + (self.module.spec.num_virtual_tokens if soft else 0)

    @property
    def budget_tokens(self) -> int:
        virtual = self.module.spec.num_virtual_tokens if self.module is not None else 0
        return self.input_len + virtual + self.max_new_tokens

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def append(self, token_id: int, logprob: float | None) -> list[Event]:
        """Record one sampled token; return the events it produces (a delta and maybe the finish)."""
        now = time.monotonic()
        if self.clock.first_token is None:
            self.clock.first_token = now
        self.generated.append(token_id)
        if self.sampling.seen_ids:
            self.sampling.seen_ids.append(token_id)
        self._pending_ids.append(token_id)
        if self.params.logprobs and logprob is not None:
            token = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._pending_logprobs.append(TokenLogprob(token_id, token, float(logprob)))

        text = ""
        if token_id in self._eos_ids:
            reason: FinishReason | None = FinishReason.EOS
        else:
            text, stopped = self._stops.push(self._detok.push(token_id))
            reason = FinishReason.STOP if stopped else None
            if reason is None and len(self.generated) >= self.max_new_tokens:
                reason = FinishReason.LENGTH
        if reason is FinishReason.EOS or reason is FinishReason.LENGTH:
            # The end: release what was held back for an incomplete character or a partial stop.
            tail, stopped = self._stops.push(self._detok.flush())
            text += tail if stopped else tail + self._stops.flush()
            reason = FinishReason.STOP if stopped else reason
        if reason is not None:
            return [self.finish(reason, self._delta(text), now)]
        return [self._delta(text)] if text else []

    def _delta(self, text: str) -> TokenDelta:
        delta = TokenDelta(text, tuple(self._pending_ids), tuple(self._pending_logprobs))
        self._pending_ids, self._pending_logprobs = [], []
        return delta

    def finish(
        self, reason: FinishReason, delta: TokenDelta | None = None, now: float | None = None
    ) -> Finished:
        self.finish_reason = reason
        self.clock.finished = now or time.monotonic()
        if delta is None and self._pending_ids:
            delta = self._delta("")
        return Finished(
            reason=reason,
            prompt_tokens=len(self.prompt_ids),
            generated_tokens=len(self.generated),
            timing=self.clock.timing(),
            delta=delta,
        )
