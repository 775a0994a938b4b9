from __future__ import annotations

import math

import pytest

from plugboard_server.engine.config import EngineConfig
from plugboard_server.engine.types import ChatMessage, SamplingParams
from plugboard_server.engine.validation import check_choices, check_input, check_lengths, resolve_params
from plugboard_server.errors import InvalidRequest

CFG = EngineConfig(max_new_tokens=100, default_max_new_tokens=16, max_stop_sequences=2)


def test_defaults_are_filled_in():
    p = resolve_params(SamplingParams(), CFG)
    assert p.max_new_tokens == 16 and p.greedy


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (SamplingParams(max_new_tokens=0), "max_new_tokens"),
        (SamplingParams(max_new_tokens=101), "max_new_tokens"),
        (SamplingParams(temperature=-0.1), "temperature"),
        (SamplingParams(temperature=math.nan), "temperature"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(top_p=1.5), "top_p"),
        (SamplingParams(top_k=-1), "top_k"),
        (SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
        (SamplingParams(repetition_penalty=math.inf), "repetition_penalty"),
        (SamplingParams(seed=-1), "seed"),
        (SamplingParams(stop=("a", "b", "c")), "stop"),
        (SamplingParams(stop=("",)), "stop"),
    ],
)
def test_bad_params_name_the_field(params, field):
    with pytest.raises(InvalidRequest) as err:
        resolve_params(params, CFG)
    assert err.value.field == field


@pytest.mark.parametrize(
    ("prompt", "messages"),
    [("", ()), ("x", (ChatMessage("user", "y"),)), ("", (ChatMessage("robot", "y"),))],
)
def test_bad_inputs(prompt, messages):
    with pytest.raises(InvalidRequest):
        check_input(prompt, messages, has_chat_template=True)


def test_messages_need_a_chat_template():
    with pytest.raises(InvalidRequest, match="chat template"):
        check_input("", (ChatMessage("user", "y"),), has_chat_template=False)


def test_lengths():
    check_lengths(10, 10, max_input=10, max_context=20)
    with pytest.raises(InvalidRequest, match="over the limit"):
        check_lengths(11, 1, max_input=10, max_context=100)
    with pytest.raises(InvalidRequest, match="context"):
        check_lengths(10, 11, max_input=10, max_context=20)


def test_choices():
    check_choices(("a", "b"), CFG)
    for bad in [("a",), ("a", ""), tuple("x" * 65)]:
        with pytest.raises(InvalidRequest):
            check_choices(bad, CFG)
