"""The engine: continuous batching of generation requests over one frozen model.

Requests join the running batch at the next step and leave it when they finish or are cancelled.
Each loop iteration does, on one worker thread (the event loop stays free for health checks and
new calls): drop finished / cancelled rows, run pending score jobs, prefill the newly admitted
requests (their first token), decode one token for the rows already running, merge the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from plugboard_server.adapters.manager import AdapterManager, Resident
from plugboard_server.adapters.shape import model_shape
from plugboard_server.adapters.types import AdapterLimits, AdapterWeights
from plugboard_server.engine import validation
from plugboard_server.engine.batch import Batch
from plugboard_server.engine.config import EngineConfig
from plugboard_server.engine.prompt import encode_prompt
from plugboard_server.engine.reporting import model_info, record_finish
from plugboard_server.engine.runner import ModelRunner
from plugboard_server.engine.sampling import sample
from plugboard_server.engine.scheduler import FinishRate, Scheduler, plan_prefill
from plugboard_server.engine.scoring import ScoreJob, score_result
from plugboard_server.engine.sequence import Event, Sequence
from plugboard_server.engine.stream import GenerationStream
from plugboard_server.engine.types import (
    ChatMessage,
    Finished,
    FinishReason,
    GenerateInput,
    GenerateResult,
    ModelInfo,
    ScoreInput,
    ScoreResult,
    Tokenized,
)
from plugboard_server.errors import InvalidRequest, NotReady, Overloaded, PlugboardError
from plugboard_server.metrics import Metrics
from plugboard_server.models.loading import LoadedModel
from plugboard_server.registry.store import AdapterRef, ModuleFacts

log = logging.getLogger(__name__)


class EngineFailure(PlugboardError):
    """A model step failed; the requests in it are ended with this error, the engine goes on."""


@dataclass
class _StepOutput:
    events: list[tuple[Sequence, Event]] = field(default_factory=list)
    scored: list[ScoreJob] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig | None = None,
        metrics: Metrics | None = None,
        fetch: Callable[[AdapterRef], Path] | None = None,
    ):
        """`fetch` gets a module version's files from the registry (default: read a directory registry
        in place); see AdapterStore.fetch."""
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.config = config or EngineConfig()
        self.metrics = metrics or Metrics()
        self.max_input_tokens = self.config.max_input_tokens or loaded.max_context - 1
        cfg = self.config
        self.adapters = AdapterManager(
            loaded.model,
            model_shape(loaded.model),
            max_slots=cfg.max_loaded_adapters,
            max_host=cfg.max_host_adapters,
            limits=AdapterLimits(max_lora_rank=cfg.max_lora_rank, max_prefix_tokens=cfg.max_prefix_tokens),
            dtype=loaded.dtype,
            device=loaded.device,
            metrics=self.metrics,
            fetch=fetch,
        )
        self._runner = ModelRunner(loaded, self.adapters.lora.batch)
        self._scheduler = Scheduler(self.config)
        self._eos_ids = frozenset(loaded.eos_token_ids)
        self._batch: Batch | None = None
        self._score_jobs: deque[ScoreJob] = deque()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plugboard-step")
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = True
        self._task: asyncio.Task[None] | None = None
        self._finished = FinishRate()  # for the retry hint of a refused request

    # ----- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="plugboard-engine")

    def stop_accepting(self) -> None:
        """Refuse new requests (draining); those already in flight go on."""
        self._accepting = False

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or running; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def stop(self) -> None:
        self._accepting = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        # A step may still be running on the worker thread: let it end before touching the batch.
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        closed = NotReady("the server is shutting down")
        for seq in self._scheduler.drain() + (self._batch.rows if self._batch else []):
            seq.events.put_nowait(closed)
        for job in self._score_jobs:
            if not job.future.done():
                job.future.set_exception(closed)
        self._batch = None
        self.adapters.close()

    @property
    def running(self) -> int:
        return len(self._batch) if self._batch else 0

    @property
    def waiting(self) -> int:
        return len(self._scheduler)

    # ----- requests --------------------------------------------------------------------------

    def _check_accepting(self) -> None:
        if not self._accepting:
            raise NotReady("the server is draining and takes no new requests")

    async def _module(self, ref: AdapterRef | None) -> AdapterWeights | None:
        """Read and validate the module off the event loop (cached after the first request)."""
        if ref is None:
            return None
        self.adapters.check_servable(ref.key)
        return await asyncio.to_thread(self.adapters.load, ref)

    def encode(self, prompt: str, messages: tuple[ChatMessage, ...]) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, messages)

    async def submit(self, inp: GenerateInput) -> GenerationStream:
        """Queue a generation; iterate the returned stream for its deltas and its Finished event."""
        self._check_accepting()
        validation.check_input(inp.prompt, inp.messages, has_chat_template=self.loaded.has_chat_template)
        params = validation.resolve_params(inp.params, self.config)
        module = await self._module(inp.adapter)
        prompt_ids = await asyncio.to_thread(self.encode, inp.prompt, inp.messages)
        if inp.params.max_new_tokens is None:  # a default must not push a long prompt past the context
            room = max(1, self.loaded.max_context - len(prompt_ids))
            params = replace(params, max_new_tokens=min(params.max_new_tokens or 1, room))
        validation.check_lengths(
            len(prompt_ids),
            params.max_new_tokens or 0,
            max_input=self.max_input_tokens,
            max_context=self.loaded.max_context,
        )
        seq = Sequence(
            request_id=inp.request_id or uuid.uuid4().hex[:16],
            prompt_ids=prompt_ids,
            params=params,
            seed=params.seed if params.seed is not None else secrets.randbits(63),
            tokenizer=self.tokenizer,
            eos_ids=self._eos_ids,
            adapter=inp.adapter.key if inp.adapter else "",
            module=module,
        )
        self._check_accepting()
        try:
            self._scheduler.enqueue(seq)
        except Overloaded as exc:
            exc.retry_after = self.retry_after()
            raise
        self.metrics.waiting_requests.set(len(self._scheduler))
        self._idle.clear()
        self._wake.set()
        return GenerationStream(seq, self._wake)

    async def generate(self, inp: GenerateInput) -> GenerateResult:
        """Run a generation to its end and return the whole text."""
        stream = await self.submit(inp)
        return await stream.collect()

    async def score(self, inp: ScoreInput) -> ScoreResult:
        """Log-likelihood of each choice after the prompt, all choices in one forward."""
        self._check_accepting()
        validation.check_input(inp.prompt, inp.messages, has_chat_template=self.loaded.has_chat_template)
        validation.check_choices(inp.choices, self.config)
        module = await self._module(inp.adapter)
        request_id = inp.request_id or uuid.uuid4().hex[:16]
        prompt_ids = await asyncio.to_thread(self.encode, inp.prompt, inp.messages)
        choice_ids = await asyncio.to_thread(
            lambda: [self.tokenizer.encode(c, add_special_tokens=False) for c in inp.choices]
        )
        for i, ids in enumerate(choice_ids):
            if not ids:
                raise InvalidRequest("the choice has no tokens", field=f"choices[{i}]")
        validation.check_lengths(
            len(prompt_ids), 0, max_input=self.max_input_tokens, max_context=self.loaded.max_context
        )
        if len(prompt_ids) + max(len(c) for c in choice_ids) > self.loaded.max_context:
            raise InvalidRequest("the prompt and the longest choice are over the model's context", "choices")
        adapter = inp.adapter.key if inp.adapter else ""
        job = ScoreJob(
            request_id,
            [(prompt_ids, c) for c in choice_ids],
            asyncio.get_running_loop().create_future(),
            adapter=adapter,
            module=module,
        )
        if len(self._score_jobs) >= self.config.max_queued_requests:
            raise Overloaded(
                f"{len(self._score_jobs)} score requests are already waiting; retry shortly",
                retry_after=self.retry_after(),
            )
        self._score_jobs.append(job)
        self._idle.clear()
        self._wake.set()
        logprobs = await job.future
        return score_result(inp.choices, choice_ids, logprobs, adapter, len(prompt_ids), request_id)

    # ----- module administration (the Adapters service) ---------------------------------------

    async def module_facts(self, path: Path) -> ModuleFacts:
        """Validate a module directory against this base model -> what the registry stores with it."""
        return await asyncio.to_thread(self.describe_module, path)

    def describe_module(self, path: Path) -> ModuleFacts:
        """module_facts, blocking (reads the config and the safetensors header)."""
        return ModuleFacts.from_spec(self.adapters.validate(path), self.loaded.fingerprint)

    async def pin_module(self, ref: AdapterRef) -> None:
        """Load a module to a device slot and keep it there (LoadAdapter)."""
        await asyncio.to_thread(self.adapters.pin, ref)

    def unload_module(self, key: str) -> None:
        """Unpin and evict a module version from host and device; running rows keep it to their end."""
        self.adapters.unload(key)

    def residency(self, key: str) -> tuple[str, bool]:
        return self.adapters.residency(key)

    def retry_after(self) -> float:
        """Seconds after which a refused request may find room (see FinishRate.retry_after)."""
        return self._finished.retry_after(len(self._scheduler) + len(self._score_jobs))

    def info(self) -> ModelInfo:
        return model_info(self.loaded, self.config, self.max_input_tokens)

    async def tokenize(self, text: str, messages: tuple[ChatMessage, ...]) -> Tokenized:
        validation.check_input(text, messages, has_chat_template=self.loaded.has_chat_template)
        return await asyncio.to_thread(self._tokenize, text, messages)

    def _tokenize(self, text: str, messages: tuple[ChatMessage, ...]) -> Tokenized:
        ids = self.encode(text, messages)
        # Each token's own text; a token holding part of a multi-byte character shows U+FFFD.
        tokens = [self.tokenizer.decode([i], skip_special_tokens=False) for i in ids]
        return Tokenized(tuple(ids), tuple(tokens))

    # ----- the loop --------------------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._batch) or bool(len(self._scheduler)) or bool(self._score_jobs)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._has_work():
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            for seq in self._scheduler.drop_cancelled():
                self._deliver(seq, seq.finish(FinishReason.CANCELLED))
            running = self._batch.rows if self._batch else []
            admitted = self._scheduler.admit(
                (r for r in running if not r.done and not r.cancelled), reserve=self._reserve
            )
            now = time.monotonic()
            for seq in admitted:
                seq.clock.admitted = now
            jobs = self._take_score_jobs()
            try:
                out = await loop.run_in_executor(self._executor, self._iteration, admitted, jobs)
            except Exception as exc:  # a failed step ends its requests, not the engine
                log.exception("model step failed; ending the requests in it")
                self._fail_all(admitted, jobs, EngineFailure(f"model step failed: {exc}"))
                continue
            for seq, event in out.events:
                self._deliver(seq, event)
            for job in out.scored:
                self._finished.record()
                if not job.future.done():
                    if isinstance(job.result, BaseException):
                        job.future.set_exception(job.result)
                    else:
                        job.future.set_result(job.result or [])
            self.metrics.running_requests.set(self.running)
            self.metrics.waiting_requests.set(len(self._scheduler))

    def _reserve(self, seq: Sequence) -> bool:
        """Give an admitted request its module's slot; False (it waits) while every slot is busy."""
        if seq.module is None:
            return True
        seq.resident = self.adapters.reserve(seq.adapter, seq.module)
        return seq.resident is not None

    def _take_score_jobs(self) -> list[ScoreJob]:
        jobs: list[ScoreJob] = []
        budget = self.config.max_prefill_tokens
        while self._score_jobs:
            job = self._score_jobs[0]
            if job.future.cancelled():
                self._score_jobs.popleft()
                continue
            if jobs and job.padded_tokens > budget:
                break
            if job.module is not None:
                job.resident = self.adapters.reserve(job.adapter, job.module)
                if job.resident is None:
                    break  # every slot is busy: it waits
            budget -= job.padded_tokens
            jobs.append(self._score_jobs.popleft())
        return jobs

    def _fail_all(self, admitted: list[Sequence], jobs: list[ScoreJob], exc: Exception) -> None:
        rows = (self._batch.rows if self._batch else []) + admitted
        self._batch = None
        for seq in rows:
            self._release(seq.resident)
            if not seq.done:
                seq.finish_reason = FinishReason.CANCELLED
                seq.events.put_nowait(exc)
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(exc)

    def _release(self, resident: Resident | None) -> None:
        if resident is not None:
            self.adapters.release(resident)

    def _deliver(self, seq: Sequence, event: Event) -> None:
        seq.events.put_nowait(event)
        if isinstance(event, Finished):
            self._finished.record()
            record_finish(self.metrics, seq, event)

    # ----- on the step thread ----------------------------------------------------------------

    def _iteration(self, admitted: list[Sequence], jobs: list[ScoreJob]) -> _StepOutput:
        out = _StepOutput()
        self._drop_finished(out)
        for job in jobs:
            start = time.perf_counter()
            try:
                if job.resident is not None:
                    self.adapters.materialize(job.resident)
                job.result = self._runner.score(job.pairs, job.resident)
            except Exception as exc:  # reported to that caller alone
                log.exception("score request %s failed", job.request_id)
                job.result = EngineFailure(f"scoring failed: {exc}")
            finally:
                self._release(job.resident)
            self.metrics.step_duration.labels("score").observe(time.perf_counter() - start)
            out.scored.append(job)
        new_batch = self._prefill(admitted, out) if admitted else None
        if self._batch:
            self._decode(self._batch, out)
        if new_batch is not None:
            self._batch = Batch.concatenate([self._batch, new_batch]) if self._batch else new_batch
        self._drop_finished(out)
        return out

    def _drop_finished(self, out: _StepOutput) -> None:
        if not self._batch:
            return
        for seq in self._batch.rows:
            if seq.cancelled and not seq.done:
                out.events.append((seq, seq.finish(FinishReason.CANCELLED)))
        keep = []
        for i, seq in enumerate(self._batch.rows):
            if seq.done:
                self._release(seq.resident)
            else:
                keep.append(i)
        if not keep:
            self._batch = None
        else:
            self._batch.filter(keep)

    def _prefill(self, admitted: list[Sequence], out: _StepOutput) -> Batch:
        """Prefill the admitted rows, grouped by length so that short rows are not padded to long ones."""
        for seq in admitted:
            if seq.resident is not None:
                self.adapters.materialize(seq.resident)
        batches = []
        for group in plan_prefill([s.input_width for s in admitted]):
            rows = [admitted[i] for i in group]
            start = time.perf_counter()
            batch, logits = self._runner.prefill(
                [s.prompt_ids for s in rows], rows, [s.resident for s in rows]
            )
            elapsed = time.perf_counter() - start
            self.metrics.step_duration.labels("prefill").observe(elapsed)
            for seq in rows:
                seq.clock.prefill_seconds = elapsed
            self._sample_into(batch, logits, out)
            batches.append(batch)
        return Batch.concatenate(batches)

    def _decode(self, batch: Batch, out: _StepOutput) -> None:
        start = time.perf_counter()
        logits = self._runner.decode(batch)
        self.metrics.step_duration.labels("decode").observe(time.perf_counter() - start)
        self.metrics.batch_size.observe(len(batch))
        self._sample_into(batch, logits, out)

    def _sample_into(self, batch: Batch, logits, out: _StepOutput) -> None:
        tokens, logprobs = sample(logits, [s.sampling for s in batch.rows])
        batch.next_ids = tokens
        token_list = tokens.tolist()
        lp_list = logprobs.tolist() if logprobs is not None else [None] * len(token_list)
        for seq, tok, lp in zip(batch.rows, token_list, lp_list, strict=True):
            out.events.extend((seq, ev) for ev in seq.append(tok, lp))
