"""Every Generation RPC through a real gRPC server and the client library."""

from __future__ import annotations

import asyncio
import threading

import pytest

from plugboard.v1 import generation_pb2 as pb
from plugboard_client import AsyncClient

PROMPT = "The quick brown fox"


def test_generate_returns_text_counts_and_timing(client):
    r = client.generate(PROMPT, max_new_tokens=12, ignore_eos=True, request_id="req-1")
    assert r.finish_reason == pb.LENGTH
    assert (r.generated_tokens, r.request_id, r.adapter) == (12, "req-1", "")
    assert r.prompt_tokens == len(client.tokenize(PROMPT).token_ids)
    assert r.timing.total_seconds >= r.timing.first_token_seconds > 0
    assert r.text


def test_stream_deltas_add_up_to_the_whole_text(client):
    whole = client.generate(PROMPT, max_new_tokens=20, ignore_eos=True)
    messages = list(client.generate_stream(PROMPT, max_new_tokens=20, ignore_eos=True, logprobs=True))
    assert "".join(m.text for m in messages) == whole.text
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    last = messages[-1]
    assert (last.finish_reason, last.generated_tokens, last.prompt_tokens) == (
        pb.LENGTH,
        20,
        whole.prompt_tokens,
    )
    assert sum(len(m.token_ids) for m in messages) == 20
    assert sum(len(m.logprobs) for m in messages) == 20


def test_messages_go_through_the_chat_template(client, tiny_model):
    messages = [{"role": "user", "content": "hi"}]
    expected = tiny_model.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert list(client.tokenize(messages=messages).token_ids) == list(expected)
    r = client.generate(messages=messages, max_new_tokens=4, ignore_eos=True)
    assert r.prompt_tokens == len(expected)


def test_seeded_sampling_repeats(client):
    kw = dict(max_new_tokens=10, temperature=0.8, seed=5, ignore_eos=True)
    assert client.generate(PROMPT, **kw).text == client.generate(PROMPT, **kw).text


def test_score_and_model_info(client, tiny_model):
    s = client.score("The quick brown", choices=[" fox", " dog"])
    assert [c.choice for c in s.scores] == [" fox", " dog"]
    assert sum(c.probability for c in s.scores) == pytest.approx(1.0)
    assert s.best in (" fox", " dog")
    info = client.model_info()
    assert info.fingerprint == tiny_model.fingerprint
    assert (info.num_layers, info.num_key_value_heads, info.has_chat_template) == (2, 2, True)
    assert info.max_context_tokens == 512


def test_concurrent_requests_batch_and_each_gets_its_own_answer(client):
    prompts = [f"{PROMPT} {i}" for i in range(6)]
    alone = {p: client.generate(p, max_new_tokens=16, ignore_eos=True).text for p in prompts}
    results: dict[str, str] = {}

    def call(p: str) -> None:
        results[p] = client.generate(p, max_new_tokens=16, ignore_eos=True).text

    threads = [threading.Thread(target=call, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone


def test_async_client(server):
    async def run() -> None:
        async with AsyncClient(server.target, timeout=30) as c:
            r = await c.generate(PROMPT, max_new_tokens=8, ignore_eos=True)
            pieces = [m.text async for m in c.generate_stream(PROMPT, max_new_tokens=8, ignore_eos=True)]
            assert "".join(pieces) == r.text
            both = await asyncio.gather(
                *(c.generate(PROMPT, max_new_tokens=8, ignore_eos=True) for _ in range(3))
            )
            assert {b.text for b in both} == {r.text}
            assert (await c.model_info()).num_layers == 2

    asyncio.run(run())
