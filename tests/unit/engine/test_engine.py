"""The engine end to end on a tiny model: continuous batching, sampling, stops, EOS, cancel, score."""

from __future__ import annotations

import asyncio

import pytest

from plugboard_server.engine.config import EngineConfig
from plugboard_server.engine.engine import Engine
from plugboard_server.engine.types import (
    Finished,
    FinishReason,
    GenerateInput,
    SamplingParams,
    ScoreInput,
    TokenDelta,
)
from plugboard_server.errors import InvalidRequest, NotReady, Overloaded
from plugboard_server.models.loading import load_model

PROMPTS = ["The quick brown fox", "Plugboard serves", "What is the capital of France?", "Café 🙂 東京"]
GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)


@pytest.fixture
async def engine(tiny_model):
    e = Engine(tiny_model, EngineConfig(max_batch_size=8))
    await e.start()
    yield e
    await e.stop()


def _clean_piece(text: str, start: int) -> str:
    """Two characters of text from `start` on with no U+FFFD (random models emit many partial bytes)."""
    for i in range(start, len(text) - 1):
        if "\ufffd" not in text[i : i + 2]:
            return text[i : i + 2]
    raise AssertionError(f"no clean piece in {text!r}")


def _req(prompt: str, params: SamplingParams = GREEDY) -> GenerateInput:
    return GenerateInput(prompt=prompt, params=params)


async def test_greedy_is_the_same_alone_together_and_joining_mid_flight(engine):
    alone = [(await engine.generate(_req(p))).token_ids for p in PROMPTS]
    together = await asyncio.gather(*(engine.generate(_req(p)) for p in PROMPTS))
    assert [r.token_ids for r in together] == alone

    async def join_after(prompt: str, tokens_seen: int) -> tuple[int, ...]:
        # Join once the long-running request has produced `tokens_seen` tokens.
        while sum(len(s.generated) for s in (engine._batch.rows if engine._batch else [])) < tokens_seen:
            await asyncio.sleep(0)
        return (await engine.generate(_req(prompt))).token_ids

    long_running = asyncio.ensure_future(
        engine.generate(_req(PROMPTS[0], SamplingParams(max_new_tokens=200, ignore_eos=True)))
    )
    joined = await asyncio.gather(*(join_after(p, 5 * (i + 1)) for i, p in enumerate(PROMPTS[1:])))
    assert list(joined) == alone[1:]
    assert (await long_running).token_ids[:24] == alone[0]


async def test_seeded_sampling_is_reproducible_alone_and_batched(engine):
    params = SamplingParams(
        max_new_tokens=24, temperature=0.9, top_p=0.95, top_k=40, seed=1234, ignore_eos=True
    )
    alone = await engine.generate(_req(PROMPTS[1], params))
    again = await engine.generate(_req(PROMPTS[1], params))
    batched = await asyncio.gather(*(engine.generate(_req(p, params)) for p in PROMPTS))
    assert alone.token_ids == again.token_ids == batched[1].token_ids
    assert alone.seed == 1234
    other_seed = await engine.generate(_req(PROMPTS[1], SamplingParams(**{**params.__dict__, "seed": 99})))
    assert other_seed.token_ids != alone.token_ids


async def test_unseeded_sampling_reports_the_seed_that_reproduces_it(engine):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, ignore_eos=True)
    first = await engine.generate(_req(PROMPTS[0], params))
    replay = await engine.generate(
        _req(PROMPTS[0], SamplingParams(**{**params.__dict__, "seed": first.seed}))
    )
    assert replay.token_ids == first.token_ids


async def test_stop_sequence_ends_generation_and_is_not_returned(engine):
    full = await engine.generate(_req(PROMPTS[0]))
    stop = _clean_piece(full.text, start=len(full.text) // 2)
    stopped = await engine.generate(
        _req(PROMPTS[0], SamplingParams(max_new_tokens=24, stop=(stop,), ignore_eos=True))
    )
    assert stopped.reason is FinishReason.STOP
    assert stopped.text == full.text[: full.text.index(stop)]
    assert stopped.generated_tokens < full.generated_tokens


async def test_stop_text_never_reaches_a_stream(engine):
    full = await engine.generate(_req(PROMPTS[1]))
    stop = _clean_piece(full.text, start=3)
    stream = await engine.submit(
        _req(PROMPTS[1], SamplingParams(max_new_tokens=24, stop=(stop,), ignore_eos=True))
    )
    pieces = [
        e.text if isinstance(e, TokenDelta) else (e.delta.text if e.delta else "") async for e in stream
    ]
    assert "".join(pieces) == full.text[: full.text.index(stop)]


async def test_eos_ends_generation(tiny_model_dir):
    probe = load_model(str(tiny_model_dir))
    e = Engine(probe)
    await e.start()
    try:
        ref = await e.generate(_req(PROMPTS[0]))
        eos = ref.token_ids[3]
        first = ref.token_ids.index(eos)
        probe.model.generation_config.eos_token_id = eos
        e2 = Engine(probe)
        await e2.start()
        got = await e2.generate(_req(PROMPTS[0], SamplingParams(max_new_tokens=24)))
        await e2.stop()
    finally:
        await e.stop()
    assert got.reason is FinishReason.EOS
    assert got.generated_tokens == first + 1  # the EOS token counts, its text does not
    assert got.token_ids == ref.token_ids[: first + 1]


async def test_max_new_tokens_ends_with_length(engine):
    r = await engine.generate(_req(PROMPTS[0], SamplingParams(max_new_tokens=5, ignore_eos=True)))
    assert (r.reason, r.generated_tokens, len(r.token_ids)) == (FinishReason.LENGTH, 5, 5)
    assert r.timing.total_seconds >= r.timing.first_token_seconds > 0


async def test_cancel_frees_the_row_at_the_next_step(engine):
    stream = await engine.submit(_req(PROMPTS[0], SamplingParams(max_new_tokens=400, ignore_eos=True)))
    while engine.running == 0:
        await asyncio.sleep(0.001)
    stream.cancel()
    events = [e async for e in stream]
    assert isinstance(events[-1], Finished) and events[-1].reason is FinishReason.CANCELLED
    assert events[-1].generated_tokens < 400
    assert await engine.wait_idle(5)
    assert engine.running == 0 and engine._batch is None


async def test_a_cancelled_caller_cancels_its_request(engine):
    task = asyncio.ensure_future(
        engine.generate(_req(PROMPTS[0], SamplingParams(max_new_tokens=400, ignore_eos=True)))
    )
    while engine.running == 0:
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await engine.wait_idle(5)


async def test_logprobs_are_returned_per_token(engine):
    r = await engine.generate(
        _req(PROMPTS[0], SamplingParams(max_new_tokens=6, logprobs=True, ignore_eos=True))
    )
    assert [lp.token_id for lp in r.logprobs] == list(r.token_ids)
    assert all(lp.logprob <= 0 for lp in r.logprobs)


async def test_score_probabilities_sum_to_one_and_prefer_the_obvious_choice(engine, tiny_model):
    import torch

    tok = tiny_model.tokenizer
    prompt = "The quick brown"
    ids = tok.encode(prompt, add_special_tokens=False)
    with torch.inference_mode():
        logits = tiny_model.model(input_ids=torch.tensor([ids])).logits[0, -1]

    def single_token_text(order: list[int]) -> str:
        for i in order:  # a token whose text encodes back to exactly itself
            text = tok.decode([i])
            if "\ufffd" not in text and tok.encode(text, add_special_tokens=False) == [i]:
                return text
        raise AssertionError("no round-tripping token")

    likeliest = single_token_text(logits.argsort(descending=True).tolist())
    unlikeliest = single_token_text(logits.argsort().tolist())
    result = await engine.score(ScoreInput(prompt=prompt, choices=(unlikeliest, likeliest, "fox jumps")))
    assert result.best == likeliest
    assert sum(s.probability for s in result.scores) == pytest.approx(1.0)
    assert [s.choice for s in result.scores] == [unlikeliest, likeliest, "fox jumps"]
    expected = torch.log_softmax(logits, -1)[tok.encode(likeliest, add_special_tokens=False)[0]]
    assert result.scores[1].logprob == pytest.approx(float(expected), abs=1e-4)


async def test_bad_requests_are_refused_before_queueing(engine):
    with pytest.raises(InvalidRequest):
        await engine.submit(_req("", GREEDY))
    with pytest.raises(InvalidRequest, match="over the limit"):
        await engine.submit(_req("word " * 600))
    prompt_300 = engine.tokenizer.decode(
        engine.tokenizer.encode("fox " * 600, add_special_tokens=False)[:300]
    )
    with pytest.raises(InvalidRequest, match="context"):
        await engine.submit(_req(prompt_300, SamplingParams(max_new_tokens=250)))
    with pytest.raises(InvalidRequest):
        await engine.score(ScoreInput(prompt="x", choices=("only",)))
    with pytest.raises(InvalidRequest, match="longest choice"):
        await engine.score(ScoreInput(prompt=prompt_300, choices=("fox " * 150, "dog")))
    assert engine.waiting == 0


async def test_a_full_queue_is_overloaded(tiny_model):
    e = Engine(tiny_model, EngineConfig(max_queued_requests=1))  # not started: nothing leaves the queue
    await e.submit(_req("a"))
    with pytest.raises(Overloaded):
        await e.submit(_req("b"))
    await e.stop()


async def test_the_retry_hint_follows_the_finish_rate_and_the_queue(tiny_model):
    e = Engine(tiny_model, EngineConfig(max_batch_size=1, max_queued_requests=20))
    await e.start()
    short = SamplingParams(max_new_tokens=2, ignore_eos=True)
    assert e.retry_after() == 1.0  # nothing finished yet: a plain second
    await asyncio.gather(*(e.generate(_req(p, short)) for p in PROMPTS * 4))
    idle_hint = e.retry_after()
    long = await e.submit(_req("hold the only row", SamplingParams(max_new_tokens=400, ignore_eos=True)))
    await long.__anext__()
    queued = [await e.submit(_req("queued", short)) for _ in range(20)]
    with pytest.raises(Overloaded) as err:
        await e.submit(_req("one too many", short))
    assert 0.05 <= idle_hint <= err.value.retry_after <= 30  # a longer queue: a longer wait
    for stream in (long, *queued):
        stream.cancel()
    await e.stop()


async def test_draining_refuses_new_work_and_finishes_the_old(engine):
    running = asyncio.ensure_future(
        engine.generate(_req(PROMPTS[0], SamplingParams(max_new_tokens=50, ignore_eos=True)))
    )
    while engine.running == 0:
        await asyncio.sleep(0.001)
    engine.stop_accepting()
    with pytest.raises(NotReady):
        await engine.submit(_req("late"))
    assert await engine.wait_idle(10)
    assert (await running).generated_tokens == 50
