"""evaluate(): batched, right-padded scoring and greedy decoding equal one example at a time, unpadded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from plugboard_tuning.data import Example
from plugboard_tuning.evaluate import evaluate, label_choices
from tests.support import peft_modules as pm

# Prompts of different lengths, so batches pad; two-token and one-token choices.
TEXTS = ["a", "good film", "the plot is thin and slow", "yes", "a long and winding road to nowhere", "ok"]
CHOICES = {"pos": " positive", "neg": " not good at all"}
EXAMPLES = [
    Example(f"Review: {t}\nAnswer:", CHOICES[label], label)
    for t, label in zip(TEXTS, ["pos", "neg", "neg", "pos", "neg", "pos"], strict=True)
]


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _reference(model, tok, ex: Example, choices: list[str], eos: set[int]) -> tuple[str, list[int]]:
    """The best choice and the greedy tokens, computed for one example with no padding at all."""
    prompt = _ids(tok, ex.prompt)

    def logprobs(ids: list[int]) -> torch.Tensor:
        t = torch.tensor([ids])
        logits = model(input_ids=t, attention_mask=torch.ones_like(t)).logits[0, -len(ids) :]
        return torch.log_softmax(logits.float(), dim=-1)

    totals = []
    for c in choices:
        cid = _ids(tok, c)
        lp = logprobs(prompt + cid)
        totals.append(sum(float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(cid)))
    out: list[int] = []
    for _ in range(len(_ids(tok, ex.target)) + 1):
        token = int(logprobs(prompt + out)[-1].argmax())
        if token in eos:
            break
        out.append(token)
    return choices[max(range(len(choices)), key=totals.__getitem__)], out


@pytest.mark.parametrize("kind", ["base", "prefix", "prompt", "lora"])
def test_batched_evaluation_equals_one_at_a_time(kind: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    from plugboard_server.models.loading import load_model

    loaded = load_model(str(tiny_model_dir), device="cpu")
    model = loaded.model
    if kind != "base":
        build = {"prefix": pm.prefix, "prompt": pm.prompt_tuning, "lora": pm.lora}[kind]
        model = PeftModel.from_pretrained(model, str(build(tiny_model_dir, tmp_path / kind, seed=3))).eval()
    tok = loaded.tokenizer
    eos = set(loaded.eos_token_ids)
    choices = label_choices(EXAMPLES)
    assert choices == [" not good at all", " positive"]  # by label: neg, pos

    ev = evaluate(model, tok, EXAMPLES, eos_token_ids=loaded.eos_token_ids, batch_size=4)

    assert ev.examples == len(EXAMPLES) and len(ev.predictions) == len(EXAMPLES)
    for ex, pred in zip(EXAMPLES, ev.predictions, strict=True):
        best, greedy = _reference(model, tok, ex, choices, eos)
        assert pred.choice == best
        assert list(pred.generated_ids) == greedy
        text = tok.decode(greedy, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert pred.generated == text
        assert pred.max_new_tokens == len(_ids(tok, ex.target)) + 1
    pairs = list(zip(ev.predictions, EXAMPLES, strict=True))
    assert ev.accuracy == sum(p.choice == ex.target for p, ex in pairs) / len(pairs)
    assert ev.exact_match == sum(p.generated.strip() == ex.target.strip() for p, ex in pairs) / len(pairs)


def test_a_model_that_learned_the_answers_scores_full_marks(tiny_model_dir: Path) -> None:
    """Exact match and accuracy reach 1.0 when the model says the targets: train it to."""
    from plugboard_server.models.loading import load_model
    from plugboard_tuning.train import TrainConfig, train

    loaded = load_model(str(tiny_model_dir), device="cpu")
    examples = [Example(f"word: {w}", t, lab) for w, t, lab in [("up", " yes", "y"), ("down", " no", "n")]]
    cfg = TrainConfig(method="lora", max_steps=40, learning_rate=2e-2, batch_size=2)
    trained = train(loaded.model, loaded.tokenizer, examples, cfg)
    ev = evaluate(trained.model, loaded.tokenizer, examples, eos_token_ids=loaded.eos_token_ids)
    assert (ev.accuracy, ev.exact_match) == (1.0, 1.0), ev.predictions
    assert [p.generated for p in ev.predictions] == [" yes", " no"]  # then EOS, which it learned too


def test_unlabelled_data_has_exact_match_only(tiny_model: object) -> None:
    examples = [Example("word: cat", " dog"), Example("word: sun", " moon")]
    assert label_choices(examples) == []
    ev = evaluate(tiny_model.model, tiny_model.tokenizer, examples, eos_token_ids=tiny_model.eos_token_ids)
    assert ev.accuracy is None and set(ev.figures()) == {"exact_match"}
