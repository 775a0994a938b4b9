from __future__ import annotations

from plugboard_server.engine.detokenize import IncrementalDetokenizer

TEXT = "Café 🙂 東京 and Москва 🚀!"


def _stream(tokenizer, prompt: str, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt, add_special_tokens=False))
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    return deltas


def test_deltas_join_to_the_whole_text_and_never_split_a_character(tiny_model):
    tok = tiny_model.tokenizer
    ids = tok.encode(TEXT, add_special_tokens=False)
    # The tokenizer really does split these characters across tokens, or this test proves nothing.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    deltas = _stream(tok, "Hello ", ids)
    assert "".join(deltas) == TEXT
    assert all("\ufffd" not in d for d in deltas)


def test_spacing_of_the_first_token_follows_the_prompt(tiny_model):
    tok = tiny_model.tokenizer
    ids = tok.encode(" fox jumps", add_special_tokens=False)
    assert "".join(_stream(tok, "The quick brown", ids)) == " fox jumps"


def test_an_incomplete_character_at_the_end_is_flushed(tiny_model):
    tok = tiny_model.tokenizer
    ids = tok.encode("ok 🙂", add_special_tokens=False)[:-1]  # cut inside the emoji
    deltas = _stream(tok, "", ids)
    assert deltas[-1].endswith("\ufffd")
    assert "".join(deltas) == tok.decode(ids)
