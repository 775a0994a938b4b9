"""Modules through the real server: all kinds and base rows in one batch, each row as if alone."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from plugboard_client import AsyncClient, Client, FailedPrecondition, InvalidArgument, NotFound
from plugboard_server.models.loading import load_model
from tests.support.module_zoo import build_broken, build_zoo
from tests.support.server import ServerThread, server_config
from tests.support.tiny_model import build_llama

PROMPTS = [
    "The quick brown fox",
    "Plugboard serves",
    "What is the capital of France?",
    "Café 🙂 東京",
    "yes no",
]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("zoo")
    names = build_zoo(tiny_model_dir, root, count=32)
    other = build_llama(tmp_path_factory.mktemp("models") / "other-llama", layers=3, seed=1)
    broken_root = tmp_path_factory.mktemp("broken")
    broken = build_broken(tiny_model_dir, other, broken_root)
    return root, names, (broken_root, broken)


@pytest.fixture(scope="module")
def module_server(zoo, tiny_model_dir):
    root, _, _ = zoo
    # A model object of its own: serving LoRA wraps its linear layers.
    srv = ServerThread(
        server_config(adapters_dir=root, max_batch_size=48, max_loaded_adapters=40, max_lora_rank=16),
        loader=lambda: load_model(str(tiny_model_dir)),
    ).start()
    yield srv
    srv.stop()


def _requests(names: list[str]) -> list[tuple[str, str]]:
    """(adapter, prompt) pairs: every module, plus base rows, with different prompt lengths."""
    rng = random.Random(0)
    reqs = [(name, PROMPTS[i % len(PROMPTS)]) for i, name in enumerate(names)]
    reqs += [("", p) for p in PROMPTS[:4]]
    rng.shuffle(reqs)
    return reqs


def test_every_row_of_a_mixed_batch_equals_the_same_request_alone(module_server, zoo):
    _, names, _ = zoo
    requests = _requests(names)
    with Client(module_server.target, timeout=60) as c:
        alone = [c.generate(p, adapter=a, max_new_tokens=10, ignore_eos=True) for a, p in requests]
    assert {r.adapter for r in alone} == {f"{n}@1" for n in names} | {""}

    async def together() -> list:
        async with AsyncClient(module_server.target, timeout=120) as c:

            async def one(i: int, adapter: str, prompt: str):
                await asyncio.sleep(0.002 * (i % 6))  # rows join the running batch at different steps
                return await c.generate(prompt, adapter=adapter, max_new_tokens=10, ignore_eos=True)

            return await asyncio.gather(*(one(i, a, p) for i, (a, p) in enumerate(requests)))

    batched = asyncio.run(together())
    mismatched = [
        (adapter, prompt)
        for (adapter, prompt), x, y in zip(requests, alone, batched, strict=True)
        if x.text != y.text
    ]
    assert not mismatched
    # The modules really differ from the base model and from each other.
    texts = {r.text for r, (a, _) in zip(alone, requests, strict=True) if a}
    assert len(texts) > len(names) // 2


def test_streaming_and_score_honour_the_module(module_server, zoo):
    _, names, _ = zoo
    lora = next(n for n in names if n.startswith("lora"))
    with Client(module_server.target, timeout=60) as c:
        whole = c.generate(PROMPTS[0], adapter=lora, max_new_tokens=8, ignore_eos=True)
        stream = list(c.generate_stream(PROMPTS[0], adapter=lora, max_new_tokens=8, ignore_eos=True))
        assert "".join(m.text for m in stream) == whole.text
        assert stream[-1].adapter == f"{lora}@1"
        for name in (
            lora,
            next(n for n in names if n.startswith("prefix")),
            next(n for n in names if "prompt" in n),
        ):
            scored = c.score(PROMPTS[1], choices=[" fox", " dog"], adapter=name)
            base = c.score(PROMPTS[1], choices=[" fox", " dog"])
            assert scored.adapter == f"{name}@1" and base.adapter == ""
            assert scored.scores[0].logprob != pytest.approx(base.scores[0].logprob, abs=1e-4)
        assert (
            c.generate(PROMPTS[0], adapter=f"{lora}@1", max_new_tokens=8, ignore_eos=True).text == whole.text
        )


def test_score_with_a_module_equals_peft(module_server, zoo, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, names, _ = zoo
    with Client(module_server.target, timeout=60) as c:
        for name in (names[0], names[1], names[2]):  # a prefix, a LoRA, a soft prompt
            got = c.score("The quick brown", choices=[" fox", " dog jumps"], adapter=name)
            peft = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(tiny_model_dir), root / name
            ).eval()
            tok = load_model(str(tiny_model_dir)).tokenizer
            prompt = tok.encode("The quick brown", add_special_tokens=False)
            for choice_score in got.scores:
                cont = tok.encode(choice_score.choice, add_special_tokens=False)
                ids = torch.tensor([prompt + cont])
                with torch.inference_mode():
                    logits = peft(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
                n = len(prompt) + len(cont)
                # PEFT's prompt tuning returns logits for its virtual tokens too: keep the real ones.
                logp = torch.log_softmax(logits[-n:], -1)
                expected = sum(float(logp[n - len(cont) - 1 + j, t]) for j, t in enumerate(cont))
                assert choice_score.logprob == pytest.approx(expected, abs=1e-3), name


def test_refusals_name_the_problem_and_the_server_keeps_serving(module_server, zoo):
    _, names, (broken_root, broken) = zoo
    with Client(module_server.target, timeout=60) as c:
        with pytest.raises(NotFound, match="no-such-module"):
            c.generate("x", adapter="no-such-module", max_new_tokens=2)
        with pytest.raises(NotFound):
            c.generate("x", adapter=f"{names[0]}@2", max_new_tokens=2)
        with pytest.raises(InvalidArgument):
            c.generate("x", adapter="bad name!", max_new_tokens=2)
        for name, phrase in broken.items():
            with pytest.raises((FailedPrecondition, InvalidArgument)) as err:
                c.register_adapter(broken_root / name, name=name)
            assert phrase.lower() in err.value.details.lower(), err.value.details
            with pytest.raises(NotFound):  # nothing was stored
                c.generate("x", adapter=name, max_new_tokens=2)
        assert c.generate("x", adapter=names[0], max_new_tokens=2).generated_tokens == 2
        info = c.model_info()
        assert (info.max_loaded_adapters, info.max_lora_rank) == (40, 16)
        assert len(info.adapter_kinds) == 3


def test_a_request_waits_for_a_slot_instead_of_failing(zoo, tiny_model_dir):
    root, names, _ = zoo
    srv = ServerThread(
        server_config(adapters_dir=root, max_loaded_adapters=2),
        loader=lambda: load_model(str(tiny_model_dir)),
    ).start()
    try:
        chosen = names[:5]
        with Client(srv.target, timeout=60) as c:
            alone = {
                n: c.generate(PROMPTS[0], adapter=n, max_new_tokens=30, ignore_eos=True).text for n in chosen
            }

        async def together() -> dict[str, str]:
            async with AsyncClient(srv.target, timeout=120) as c:
                rs = await asyncio.gather(
                    *(c.generate(PROMPTS[0], adapter=n, max_new_tokens=30, ignore_eos=True) for n in chosen)
                )
                return {n: r.text for n, r in zip(chosen, rs, strict=True)}

        assert asyncio.run(together()) == alone
        assert srv.server.engine.adapters.resident_count <= 2
    finally:
        srv.stop()
