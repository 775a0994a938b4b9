"""Fuzz the Generation service (Generate, GenerateStream, Score, Tokenize, ModelInfo) with hypothesis.

Every answer must carry the one status code the oracle (tests/support/fuzz_oracle.py) predicts, and
an OK answer is checked field by field; the module's server must survive (tests/support/fuzz_world.py).
"""

from __future__ import annotations

import math

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, note
from hypothesis import strategies as st

from plugboard.v1 import generation_pb2 as pb
from tests.support import fuzz_oracle as oracle
from tests.support import fuzz_strategies as fz
from tests.support.fuzz_oracle import Case, Expect, check
from tests.support.fuzz_world import LIMITS, STABLE_NAMES, STABLE_REFS, S, fuzz_settings, running

REFS = fz.adapter_refs(STABLE_REFS, STABLE_NAMES)
GENERATE = fz.generate_requests(REFS, LIMITS["max_new_tokens"])


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    with running(tiny_model_dir, tmp_path_factory.mktemp("fuzz-generation")) as w:
        yield w


def reproducible(req: pb.GenerateRequest) -> bool:
    return req.params.temperature == 0 or req.params.HasField("seed")


def check_generated(req: pb.GenerateRequest, case: Case, messages: list) -> tuple:
    """Check a Generate response ([it]) or a stream's messages -> what a reproducible request repeats."""
    *body, last = messages
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in body), "finish_reason before the end"
    if isinstance(last, pb.GenerateStreamResponse):
        ids = [i for m in messages for i in m.token_ids]
        assert len(ids) == last.generated_tokens, "token_ids do not add up to generated_tokens"
    text = "".join(m.text for m in messages)
    logprobs = [(x.token_id, x.logprob) for m in messages for x in m.logprobs]
    assert last.finish_reason in (pb.LENGTH, pb.STOP, pb.EOS), last.finish_reason
    assert 1 <= last.generated_tokens <= case.max_new_tokens
    assert last.finish_reason != pb.LENGTH or last.generated_tokens == case.max_new_tokens
    assert (last.prompt_tokens, last.adapter) == (case.prompt_tokens, case.adapter)
    assert last.request_id == req.request_id if req.request_id else last.request_id
    if req.params.HasField("seed"):
        assert last.seed == req.params.seed
    for stop in req.params.stop:
        assert stop not in text, f"the text holds the stop sequence {stop!r}"
    if req.params.logprobs:
        assert len(logprobs) == last.generated_tokens
        assert all(math.isfinite(lp) and lp <= 1e-4 for _, lp in logprobs), logprobs
    else:
        assert not logprobs
    return text, last.finish_reason, last.generated_tokens, [i for i, _ in logprobs]


@fuzz_settings(100)
@given(req=GENERATE)
def test_generate_and_generate_stream(world, req):
    """Both RPCs on the same request: the same status, and for a reproducible request the same text."""
    case = oracle.expect_generate(world, req)
    note(f"expecting {case.expect}")
    unary, streamed = world.call("Generate", req), world.call("GenerateStream", req)
    ok = check("Generate", unary, case.expect)
    check("GenerateStream", streamed, case.expect)
    if ok:
        one = check_generated(req, case, [unary.response])
        other = check_generated(req, case, streamed.response)
        assert one == other or not reproducible(req)


@fuzz_settings(25)
@given(requests=st.lists(GENERATE, min_size=2, max_size=4))
def test_requests_in_one_batch_do_not_disturb_each_other(world, requests):
    """Sent at once, they share batches; each must answer as it does alone (when it is reproducible)."""
    cases = [oracle.expect_generate(world, r) for r in requests]
    for req, case, answer in zip(requests, cases, world.call_at_once("Generate", requests), strict=True):
        if check("Generate", answer, case.expect):
            together = check_generated(req, case, [answer.response])
            if reproducible(req):
                alone = world.call("Generate", req)
                assert check("Generate", alone, case.expect)
                assert together == check_generated(req, case, [alone.response])


@fuzz_settings(70)
@given(raw=fz.raw_generate_requests(REFS))
def test_generate_with_bytes_only_the_wire_can_carry(world, raw):
    """Negative and 64-bit varints in uint32 fields, any float bits, repeated scalars, unknown fields,
    and bytes that are no GenerateRequest at all (INVALID_ARGUMENT)."""
    try:
        req = pb.GenerateRequest.FromString(raw)  # what the server will see
    except DecodeError as exc:
        note(f"not a message: {exc}")
        req, case = None, Case(Expect(S.INVALID_ARGUMENT, "not a protobuf message"))
    else:
        note(f"parsed as {req}")
        case = oracle.expect_generate(world, req)
    answer = world.raw("Generate", raw, pb.GenerateResponse)
    if check("Generate", answer, case.expect):
        check_generated(req, case, [answer.response])


@fuzz_settings(80)
@given(req=fz.score_requests(REFS))
def test_score(world, req):
    case = oracle.expect_score(world, req)
    answer = world.call("Score", req)
    if not check("Score", answer, case.expect):
        return
    r: pb.ScoreResponse = answer.response
    assert [s.choice for s in r.scores] == list(req.choices)
    assert [s.tokens for s in r.scores] == case.choice_tokens
    assert all(math.isfinite(s.logprob) and s.logprob <= 1e-4 for s in r.scores)
    assert math.isclose(sum(s.probability for s in r.scores), 1.0, abs_tol=1e-6)
    best = max(s.logprob for s in r.scores)
    assert r.best in {s.choice for s in r.scores if s.logprob == best}
    assert (r.adapter, r.prompt_tokens) == (case.adapter, case.prompt_tokens)
    assert r.request_id == req.request_id if req.request_id else r.request_id


@fuzz_settings(50)
@given(req=fz.tokenize_requests(), model_info=st.lists(fz.unknown_fields(1), max_size=3).map(b"".join))
def test_tokenize_and_model_info(world, req, model_info):
    expect, expected = oracle.expect_tokenize(world, req)
    answer = world.call("Tokenize", req)
    if check("Tokenize", answer, expect):
        assert answer.response == expected
    # ModelInfo takes no input; unknown fields on the wire must not change its answer
    answer = world.raw("ModelInfo", model_info, pb.ModelInfoResponse)
    assert check("ModelInfo", answer, Expect())
    assert answer.response == world.info
