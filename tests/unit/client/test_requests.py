"""Request building: prompt/messages handling, proto3 presence of optional fields, argument checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from plugboard.v1 import generation_pb2 as pb
from plugboard_client import requests


def test_prompt_request_leaves_optional_fields_unset() -> None:
    req = requests.generate_request("Hello")
    assert req.prompt == "Hello"
    assert list(req.messages) == []
    assert req.adapter == "" and req.request_id == ""
    p = req.params
    for name in ("max_new_tokens", "top_p", "repetition_penalty", "seed"):
        assert not p.HasField(name), name
    assert p.temperature == 0.0 and p.top_k == 0
    assert list(p.stop) == [] and not p.logprobs and not p.ignore_eos


def test_optional_fields_set_even_to_zero_values() -> None:
    # Presence matters: max_new_tokens=0 must reach the server (which refuses it), not mean "default".
    p = requests.generate_request("x", max_new_tokens=0, top_p=0.0, repetition_penalty=0.0, seed=0).params
    for name in ("max_new_tokens", "top_p", "repetition_penalty", "seed"):
        assert p.HasField(name), name
        assert getattr(p, name) == 0


def test_all_parameters_reach_the_request() -> None:
    req = requests.generate_request(
        "x",
        adapter="sentiment@stable",
        max_new_tokens=12,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        repetition_penalty=1.1,
        seed=2**63 + 5,
        stop=["\n", "END"],
        logprobs=True,
        ignore_eos=True,
        request_id="r-1",
    )
    p = req.params
    assert req.adapter == "sentiment@stable" and req.request_id == "r-1"
    assert p.max_new_tokens == 12 and p.top_k == 40 and p.seed == 2**63 + 5
    assert p.temperature == pytest.approx(0.7)
    assert p.top_p == pytest.approx(0.9)
    assert p.repetition_penalty == pytest.approx(1.1)
    assert list(p.stop) == ["\n", "END"]
    assert p.logprobs and p.ignore_eos


def test_a_lone_stop_string_is_one_stop_sequence() -> None:
    assert list(requests.generate_request("x", stop="END").params.stop) == ["END"]


def test_ranges_are_left_to_the_server() -> None:
    p = requests.generate_request("x", temperature=-1.0, top_p=7.0, top_k=-3).params
    assert p.temperature == -1.0 and p.top_p == 7.0 and p.top_k == -3


def test_messages_in_every_accepted_form() -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        ("user", "Hi"),
        pb.ChatMessage(role="assistant", content="Hello"),
    ]
    req = requests.generate_request(messages=msgs)
    assert req.prompt == ""
    assert [(m.role, m.content) for m in req.messages] == [
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", "Hello"),
    ]


def test_messages_may_be_any_iterable() -> None:
    req = requests.generate_request(messages=(("user", str(i)) for i in range(2)))
    assert [m.content for m in req.messages] == ["0", "1"]


def test_empty_prompt_and_empty_messages_are_sent_as_given() -> None:
    assert requests.generate_request("").prompt == ""
    assert list(requests.generate_request(messages=[]).messages) == []


@pytest.mark.parametrize("build", [requests.generate_request, requests.tokenize_request])
def test_prompt_and_messages_are_exclusive(build: Callable[..., Any]) -> None:
    with pytest.raises(ValueError, match="not both"):
        build("x", messages=[("user", "y")])
    with pytest.raises(ValueError):
        build()


def test_score_prompt_and_messages_are_exclusive() -> None:
    with pytest.raises(ValueError, match="not both"):
        requests.score_request("x", messages=[("user", "y")], choices=["a", "b"])
    with pytest.raises(ValueError):
        requests.score_request(choices=["a", "b"])


@pytest.mark.parametrize(
    ("bad", "exc"),
    [
        ({"role": "user"}, ValueError),
        ({"role": "user", "text": "hi"}, ValueError),
        ({"role": "user", "content": "hi", "name": "bob"}, ValueError),
        (("user",), ValueError),
        (("user", "a", "b"), ValueError),
        (["user", "hi"], TypeError),
        ("user: hi", TypeError),
    ],
)
def test_malformed_messages_are_refused(bad: object, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        requests.generate_request(messages=[bad])  # type: ignore[list-item]


@pytest.mark.parametrize("bad", ["hello", {"role": "user", "content": "hi"}, pb.ChatMessage(role="user")])
def test_messages_must_be_a_list_not_one_message(bad: object) -> None:
    with pytest.raises(TypeError):
        requests.generate_request(messages=bad)  # type: ignore[arg-type]


def test_prompt_must_be_a_string() -> None:
    with pytest.raises(TypeError):
        requests.generate_request(["a", "b"])  # type: ignore[arg-type]


def test_score_request() -> None:
    req = requests.score_request(
        "Review: great film. Sentiment:", choices=[" positive", " negative"], adapter="s", request_id="q"
    )
    assert req.prompt == "Review: great film. Sentiment:"
    assert list(req.choices) == [" positive", " negative"]
    assert req.adapter == "s" and req.request_id == "q"
    chat = requests.score_request(messages=[("user", "2+2?")], choices=["4", "5"])
    assert chat.prompt == "" and chat.messages[0].content == "2+2?"


def test_score_choices_are_not_checked_client_side_but_must_be_a_list() -> None:
    assert list(requests.score_request("x", choices=["only"]).choices) == ["only"]
    with pytest.raises(TypeError):
        requests.score_request("x", choices="ab")


def test_tokenize_request() -> None:
    assert requests.tokenize_request("hello") == pb.TokenizeRequest(text="hello")
    req = requests.tokenize_request(messages=[{"role": "user", "content": "hi"}])
    assert req.text == "" and req.messages[0] == pb.ChatMessage(role="user", content="hi")
