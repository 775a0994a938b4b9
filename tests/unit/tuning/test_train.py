"""Training each kind of module on the tiny Llama learns a toy word mapping and saves it loadably."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from plugboard_tuning.data import Example
from plugboard_tuning.train import StepInfo, TrainConfig, save, train

PAIRS = [
    ("cat", " dog"),
    ("sun", " moon"),
    ("yes", " no"),
    ("good", " bad"),
    ("fresh", " rotten"),
    ("quick", " lazy"),
    ("positive", " negative"),
    ("brown", " fox"),
]
EXAMPLES = [Example(f"word: {a}", b) for a, b in PAIRS]

# Rates and steps chosen so every method fits the toy task in well under a second on 2 CPU cores;
# the tiny random model needs higher rates than the production defaults. Prefix tuning uses
# "random" init here: from zero it only reaches ~0.6x the first loss on this 2-layer model in
# 120 steps (capacity, not a bug), which the 0.5x bar below would reject.
CONFIGS = {
    "prefix": TrainConfig(method="prefix", max_steps=60, learning_rate=1e-1, prefix_init="random"),
    "prompt": TrainConfig(method="prompt", max_steps=60, learning_rate=1e-1),
    "lora": TrainConfig(method="lora", max_steps=60, learning_rate=1e-2),
}


def _fresh(model_dir: Path):
    from plugboard_server.models.loading import load_model

    return load_model(str(model_dir), device="cpu")


@torch.no_grad()
def _accuracy(model, tokenizer) -> float:
    hits = 0
    for ex in EXAMPLES:
        ids = torch.tensor([tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]])
        first = tokenizer(ex.target, add_special_tokens=False)["input_ids"][0]
        hits += int(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax() == first)
    return hits / len(EXAMPLES)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_training_learns_the_mapping_and_saves_a_loadable_module(
    method: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    loaded = _fresh(tiny_model_dir)
    tokenizer = loaded.tokenizer
    before = _accuracy(loaded.model, tokenizer)
    steps: list[StepInfo] = []
    result = train(loaded.model, tokenizer, EXAMPLES * 2, CONFIGS[method], on_step=steps.append)

    assert result.steps == len(result.losses) == len(steps) == 60
    assert not result.model.training
    assert min(result.losses[-5:]) < 0.5 * result.losses[0], result.losses
    after = _accuracy(result.model, tokenizer)
    assert after >= 0.75 and after > before, (before, after)

    out = save(result, tmp_path / "module")
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(_fresh(tiny_model_dir).model, str(out)).eval()
    ids = torch.tensor([tokenizer("word: cat", add_special_tokens=False)["input_ids"]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = result.model(input_ids=ids, attention_mask=mask).logits
        actual = reloaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_early_stopping_and_validation(tiny_model_dir: Path) -> None:
    # A deliberately too-high rate makes the validation loss stall; training is seeded and on CPU,
    # so where it stops is deterministic.
    cfg = TrainConfig(
        method="prefix",
        num_virtual_tokens=2,
        max_steps=50,
        eval_every=1,
        early_stopping_patience=1,
        learning_rate=1.0,
    )
    loaded = _fresh(tiny_model_dir)
    result = train(loaded.model, loaded.tokenizer, EXAMPLES, cfg, validation=EXAMPLES)
    assert result.stopped_early and result.steps < 50
    assert len(result.validation_losses) == result.steps
    assert result.validation_losses[-1] >= min(result.validation_losses[:-1])


def test_without_eval_every_validation_runs_once_per_epoch(tiny_model_dir: Path) -> None:
    cfg = TrainConfig(
        method="lora", epochs=3, batch_size=4, grad_accum=2, lr_schedule="cosine", warmup_steps=1
    )
    loaded = _fresh(tiny_model_dir)
    lrs: list[float] = []
    result = train(
        loaded.model,
        loaded.tokenizer,
        EXAMPLES,
        cfg,
        validation=EXAMPLES[:3],
        on_step=lambda s: lrs.append(s.lr),
    )
    assert result.steps == 3  # 8 examples / batch 4 / accumulate 2 = 1 step per epoch
    assert len(result.validation_losses) == 3 and not result.stopped_early
    assert lrs[0] < lrs[1] and lrs[2] < lrs[1]  # warm-up, then cosine decay


def test_targets_end_with_eos_unless_asked_not_to(tiny_model) -> None:
    from plugboard_tuning.train import _encode

    tok = tiny_model.tokenizer
    ex = Example("word: cat", " dog")
    prompt = tok(ex.prompt, add_special_tokens=False)["input_ids"]
    target = tok(ex.target, add_special_tokens=False)["input_ids"]
    [(ids, labels)] = _encode(tok, [ex], add_eos=True)
    assert ids == prompt + target + [tok.eos_token_id]
    assert labels == [-100] * len(prompt) + target + [tok.eos_token_id]
    [(ids, labels)] = _encode(tok, [ex], add_eos=False)
    assert ids == prompt + target and labels[-len(target) :] == target


@pytest.mark.parametrize(("n", "processes"), [(5, 2), (4, 2), (1, 3), (7, 4)])
def test_shards_cover_every_batch_in_equal_counts(n: int, processes: int) -> None:
    from plugboard_tuning.train import _shard

    batches = [[i] for i in range(n)]
    shards = [_shard(batches, rank, processes) for rank in range(processes)]
    assert len({len(s) for s in shards}) == 1  # lockstep: the same number of steps everywhere
    assert {b[0] for s in shards for b in s} == set(range(n))
    assert sum(len(s) for s in shards) < n + processes


@pytest.mark.parametrize("text", ["Answer the question.", "a b c d e f g h i j k l"])
def test_prefix_text_init_behaves_as_if_the_text_came_first(text: str, tiny_model_dir: Path) -> None:
    # Learning rate 0: the prefix stays as initialised, so the model must act as if `text` (its
    # tokens repeated or cut to 6) preceded the prompt.
    cfg = TrainConfig(
        method="prefix",
        num_virtual_tokens=6,
        prefix_init="text",
        init_text=text,
        max_steps=1,
        learning_rate=0.0,
    )
    loaded = _fresh(tiny_model_dir)
    tok = loaded.tokenizer
    result = train(loaded.model, tok, EXAMPLES, cfg)
    text_ids = tok(text, add_special_tokens=False)["input_ids"]
    text_ids = (text_ids * 6)[:6]
    prompt = tok("word: cat", add_special_tokens=False)["input_ids"]
    reference = _fresh(tiny_model_dir).model
    with torch.no_grad():
        ids = torch.tensor([prompt])
        tuned = result.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
        joined = torch.tensor([text_ids + prompt])
        expected = reference(input_ids=joined, attention_mask=torch.ones_like(joined)).logits[0, 6:]
    torch.testing.assert_close(tuned, expected, atol=1e-4, rtol=0)


def test_prefix_text_init_needs_text_and_no_projection() -> None:
    with pytest.raises(ValueError, match="needs init_text"):
        TrainConfig(method="prefix", prefix_init="text")
    with pytest.raises(ValueError, match="projection"):
        TrainConfig(method="prefix", prefix_init="text", init_text="x", prefix_projection=True)
