"""The caller's handle on a submitted generation: an async iterator of events, and cancel()."""

from __future__ import annotations

import asyncio

from plugboard_server.engine.sequence import Sequence
from plugboard_server.engine.types import Finished, GenerateResult, TokenDelta, TokenLogprob


class GenerationStream:
    def __init__(self, seq: Sequence, wake: asyncio.Event) -> None:
        self._seq = seq
        self._wake = wake
        self._done = False

    @property
    def request_id(self) -> str:
        return self._seq.request_id

    @property
    def seed(self) -> int:
        return self._seq.seed

    @property
    def adapter(self) -> str:
        return self._seq.adapter

    @property
    def prompt_tokens(self) -> int:
        return len(self._seq.prompt_ids)

    def cancel(self) -> None:
        """Leave the batch at the next step (or the queue at once); the stream then ends CANCELLED."""
        if not self._seq.done:
            self._seq.cancelled = True
            self._wake.set()

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> TokenDelta | Finished:
        if self._done:
            raise StopAsyncIteration
        event = await self._seq.events.get()
        if isinstance(event, Exception):
            self._done = True
            raise event
        if isinstance(event, Finished):
            self._done = True
        return event

    async def collect(self) -> GenerateResult:
        """Consume the whole stream; cancels the request if the awaiting task is cancelled."""
        text: list[str] = []
        ids: list[int] = []
        logprobs: list[TokenLogprob] = []
        try:
            async for event in self:
                delta = event if isinstance(event, TokenDelta) else event.delta
                if delta is not None:
                    text.append(delta.text)
                    ids.extend(delta.token_ids)
                    logprobs.extend(delta.logprobs)
                if isinstance(event, Finished):
                    return GenerateResult(
                        text="".join(text),
                        reason=event.reason,
                        prompt_tokens=event.prompt_tokens,
                        generated_tokens=event.generated_tokens,
                        adapter=self.adapter,
                        request_id=self.request_id,
                        seed=self.seed,
                        timing=event.timing,
                        token_ids=tuple(ids),
                        logprobs=tuple(logprobs),
                    )
        finally:
            self.cancel()
        raise RuntimeError("generation stream ended without a Finished event")  # pragma: no cover
