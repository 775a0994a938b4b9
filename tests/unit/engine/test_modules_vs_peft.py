"""Every module kind gives PEFT's own logits and greedy tokens, alone and in a mixed batch.

The oracle is PEFT itself: each module is made by PEFT on a tiny base model (with non-trivial
weights), loaded back with PeftModel.from_pretrained, and compared with plugboard's engine, which
applies the same files without PEFT.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from plugboard_server.engine.engine import Engine
from plugboard_server.engine.runner import ModelRunner
from plugboard_server.engine.types import GenerateInput, SamplingParams
from plugboard_server.models.loading import load_model
from plugboard_server.registry.store import AdapterRef
from tests.support import peft_modules as pm
from tests.support.tiny_model import build_gpt2

MakeModule = Callable[[Path, Path], Path]

LLAMA_KINDS: dict[str, MakeModule] = {
    "prefix": lambda base, out: pm.prefix(base, out, tokens=6, seed=1),
    "prefix_projection": lambda base, out: pm.prefix(base, out, tokens=5, projection=True, seed=2),
    "prompt_tuning": lambda base, out: pm.prompt_tuning(base, out, tokens=7, seed=3),
    "p_tuning": lambda base, out: pm.p_tuning(base, out, tokens=4, seed=4),
    "lora_attention": lambda base, out: pm.lora(base, out, targets=pm.LLAMA_ATTENTION, r=4, seed=5),
    "lora_all_linear": lambda base, out: pm.lora(
        base, out, targets=pm.LLAMA_ALL_LINEAR, r=8, alpha=16, seed=6
    ),
    "rslora": lambda base, out: pm.lora(base, out, targets=["q_proj", "v_proj"], r=4, rslora=True, seed=7),
}
GPT2_KINDS: dict[str, MakeModule] = {
    "gpt2_lora_conv1d": lambda base, out: pm.lora(
        base, out, targets=["c_attn", "c_proj", "c_fc"], r=4, fan_in_fan_out=True, seed=8
    ),
    "gpt2_prefix": lambda base, out: pm.prefix(base, out, tokens=6, seed=9),
    "gpt2_prompt_tuning": lambda base, out: pm.prompt_tuning(base, out, tokens=5, seed=10),
}
PROMPTS = ["The quick brown fox", "Plugboard serves many learned task modules", "Café 🙂"]


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2")


@pytest.fixture(scope="module")
def modules(tmp_path_factory, tiny_model_dir, gpt2_base) -> dict[str, tuple[Path, Path]]:
    """kind -> (base model dir, module dir), each module built once."""
    root = tmp_path_factory.mktemp("modules")
    built = {k: (tiny_model_dir, make(tiny_model_dir, root / k)) for k, make in LLAMA_KINDS.items()}
    built.update({k: (gpt2_base, make(gpt2_base, root / k)) for k, make in GPT2_KINDS.items()})
    return built


def _peft(base_dir: Path, module_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), module_dir).eval()


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _resident(engine: Engine, name: str, module_dir: Path):
    weights = engine.adapters.load(AdapterRef(name, 1, module_dir))
    resident = engine.adapters.reserve(f"{name}@1", weights)
    engine.adapters.materialize(resident)
    return resident


def _peft_last_logits(peft_model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return peft_model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids))).logits[0, -1]


@pytest.mark.parametrize("kind", [*LLAMA_KINDS, *GPT2_KINDS])
def test_logits_and_greedy_tokens_equal_peft(kind, modules):
    base_dir, module_dir = modules[kind]
    peft_model = _peft(base_dir, module_dir)
    loaded = load_model(str(base_dir))
    engine = Engine(loaded)
    runner = ModelRunner(loaded, engine.adapters.lora.batch)
    resident = _resident(engine, kind, module_dir)
    ids = _ids(loaded.tokenizer, PROMPTS[0])

    _, ours = runner.prefill([ids], ["row"], [resident])
    _, base = runner.prefill([ids], ["row"], [None])
    ref = _peft_last_logits(peft_model, ids)
    torch.testing.assert_close(ours[0], ref, atol=1e-4, rtol=1e-4)
    assert (ours[0] - base[0]).abs().max() > 1e-2, "the module changes nothing: the comparison is vacuous"

    with torch.inference_mode():
        out = peft_model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
        )
    expected = out[0, -12:].tolist() if out.shape[1] > 12 else out[0].tolist()
    got = _generate(engine, PROMPTS[0], AdapterRef(kind, 1, module_dir), 12)
    assert got == expected[: len(got)] and len(got) == len(expected)


def _generate(engine: Engine, prompt: str, ref: AdapterRef | None, n: int) -> list[int]:
    import asyncio

    async def run() -> list[int]:
        await engine.start()
        try:
            r = await engine.generate(
                GenerateInput(prompt=prompt, adapter=ref, params=SamplingParams(max_new_tokens=n))
            )
            return list(r.token_ids)
        finally:
            await engine.stop()

    return asyncio.run(run())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_mixed_batch_gives_every_row_its_own_peft_logits(family, modules):
    kinds = [k for k in (LLAMA_KINDS if family == "llama" else GPT2_KINDS)]
    base_dir = modules[kinds[0]][0]
    loaded = load_model(str(base_dir))
    engine = Engine(loaded)
    runner = ModelRunner(loaded, engine.adapters.lora.batch)
    rows = []  # (prompt ids, resident or None, kind or None): every kind, base rows, different lengths
    for i, kind in enumerate([*kinds, None, *kinds, None]):
        ids = _ids(loaded.tokenizer, PROMPTS[i % len(PROMPTS)])
        resident = _resident(engine, kind, modules[kind][1]) if kind else None
        rows.append((ids, resident, kind))
    _, logits = runner.prefill([r[0] for r in rows], list(range(len(rows))), [r[1] for r in rows])
    base_model = None
    for row, (ids, _, kind) in enumerate(rows):
        if kind is None:
            if base_model is None:
                from transformers import AutoModelForCausalLM

                base_model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
            with torch.inference_mode():
                ref = base_model(input_ids=torch.tensor([ids])).logits[0, -1]
        else:
            ref = _peft_last_logits(_peft(base_dir, modules[kind][1]), ids)
        torch.testing.assert_close(logits[row], ref, atol=1e-4, rtol=1e-4, msg=f"row {row} ({kind})")
