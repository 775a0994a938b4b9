"""Bad input gets a clear status code, and the batch goes on for everyone else."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from plugboard.v1 import generation_pb2 as pb
from plugboard.v1 import generation_pb2_grpc
from plugboard_client import Client, ResourceExhausted, Unavailable
from tests.support.server import ServerThread, server_config

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


def _params(**kw) -> pb.GenerationParams:
    return pb.GenerationParams(**kw)


BAD_GENERATE = [
    (pb.GenerateRequest(), INVALID, "prompt"),
    (
        pb.GenerateRequest(prompt="x", messages=[pb.ChatMessage(role="user", content="y")]),
        INVALID,
        "not both",
    ),
    (pb.GenerateRequest(prompt="fox " * 2000), INVALID, "over the limit"),
    (pb.GenerateRequest(prompt="x", params=_params(max_new_tokens=0)), INVALID, "max_new_tokens"),
    (pb.GenerateRequest(prompt="x", params=_params(max_new_tokens=100000)), INVALID, "max_new_tokens"),
    (pb.GenerateRequest(prompt="x", params=_params(max_new_tokens=512)), INVALID, "context"),
    (pb.GenerateRequest(prompt="x", params=_params(temperature=-1)), INVALID, "temperature"),
    (pb.GenerateRequest(prompt="x", params=_params(top_p=0)), INVALID, "top_p"),
    (pb.GenerateRequest(prompt="x", params=_params(top_p=1.01)), INVALID, "top_p"),
    (pb.GenerateRequest(prompt="x", params=_params(top_k=-3)), INVALID, "top_k"),
    (pb.GenerateRequest(prompt="x", params=_params(repetition_penalty=0)), INVALID, "repetition_penalty"),
    (pb.GenerateRequest(prompt="x", params=_params(stop=[""])), INVALID, "stop"),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="wizard", content="y")]), INVALID, "role"),
    (pb.GenerateRequest(prompt="x", adapter="sentiment"), NOT_FOUND, "sentiment"),
    (pb.GenerateRequest(prompt="x", adapter="sentiment@stable"), NOT_FOUND, "sentiment@stable"),
]

BAD_SCORE = [
    (pb.ScoreRequest(prompt="x", choices=["a"]), INVALID, "two choices"),
    (pb.ScoreRequest(prompt="x", choices=["a", ""]), INVALID, "choices[1]"),
    (pb.ScoreRequest(prompt="", choices=["a", "b"]), INVALID, "prompt"),
    (pb.ScoreRequest(prompt="x", choices=["a", "b"], adapter="nope"), NOT_FOUND, "nope"),
]


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield generation_pb2_grpc.GenerationStub(channel)


def _code(call, request, *, stream: bool = False) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        result = call(request, timeout=30)
        if stream:
            list(result)  # a stream's status arrives as it is read
    return err.value.code(), err.value.details()


@pytest.mark.parametrize(("request_", "code", "detail"), BAD_GENERATE)
def test_bad_generate_requests(stub, request_, code, detail):
    got_code, details = _code(stub.Generate, request_)
    assert got_code == code and detail in details
    got_code, details = _code(stub.GenerateStream, request_, stream=True)
    assert got_code == code and detail in details


@pytest.mark.parametrize(("request_", "code", "detail"), BAD_SCORE)
def test_bad_score_requests(stub, request_, code, detail):
    got_code, details = _code(stub.Score, request_)
    assert got_code == code and detail in details


def test_tokenize_needs_exactly_one_input(stub):
    assert _code(stub.Tokenize, pb.TokenizeRequest())[0] == INVALID


def test_bad_requests_do_not_disturb_a_running_stream(client, stub):
    reference = client.generate("Plugboard", max_new_tokens=120, ignore_eos=True).text
    pieces: list[str] = []
    stream = client.generate_stream("Plugboard", max_new_tokens=120, ignore_eos=True)
    pieces.append(next(stream).text)
    for request_, code, _ in BAD_GENERATE:
        assert _code(stub.Generate, request_)[0] == code
    pieces.extend(m.text for m in stream)
    assert "".join(pieces) == reference


def test_a_client_that_disconnects_mid_stream_frees_its_row(server, client):
    stream = client.generate_stream("Plugboard", max_new_tokens=400, ignore_eos=True)
    next(stream)
    assert server.server.engine.running == 1
    stream.close()  # cancels the call
    deadline = time.monotonic() + 10
    while server.server.engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.server.engine.running == 0
    assert client.generate("still serving", max_new_tokens=3).generated_tokens == 3


def test_an_expired_deadline_frees_its_row(server, client):
    with pytest.raises(Exception) as err:
        list(client.generate_stream("Plugboard", max_new_tokens=400, ignore_eos=True, timeout=0.05))
    assert "DEADLINE_EXCEEDED" in repr(err.value) or "Deadline" in type(err.value).__name__
    deadline = time.monotonic() + 10
    while server.server.engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.server.engine.running == 0


def test_a_full_queue_answers_resource_exhausted_with_a_retry_hint(tiny_model):
    srv = ServerThread(
        server_config(max_batch_size=1, max_queued_requests=1), loader=lambda: tiny_model
    ).start()
    try:
        with Client(srv.target, timeout=30) as c:
            running = c.generate_stream("a", max_new_tokens=400, ignore_eos=True)
            next(running)  # in the batch
            queued = threading.Thread(target=lambda: c.generate("b", max_new_tokens=2))
            queued.start()
            while srv.server.engine.waiting == 0:
                time.sleep(0.005)
            with pytest.raises(ResourceExhausted) as err:
                c.generate("c", max_new_tokens=2)
            assert err.value.retry_after is not None and err.value.retry_after > 0
            running.close()
            queued.join(30)
            assert c.generate("d", max_new_tokens=2).generated_tokens == 2  # recovered
    finally:
        srv.stop()


def test_not_ready_is_unavailable(tiny_model):
    release = threading.Event()

    def slow_loader():
        release.wait(30)
        return tiny_model

    srv = ServerThread(server_config(), loader=slow_loader).start(wait_ready=False)
    try:
        with Client(srv.target, timeout=10) as c:
            with pytest.raises(Unavailable, match="loading"):
                c.generate("x", max_new_tokens=1)
            release.set()
            c.wait_ready(30)
            assert c.generate("x", max_new_tokens=1).generated_tokens == 1
    finally:
        release.set()
        srv.stop()


@pytest.mark.parametrize(
    "method",
    [
        "/plugboard.v1.Generation/Generate",
        "/plugboard.v1.Generation/GenerateStream",
        "/grpc.health.v1.Health/Check",
    ],
)
def test_bytes_that_are_not_a_protobuf_message_are_invalid_argument(server, method):
    with grpc.insecure_channel(server.target) as channel:
        if method.endswith("Stream"):
            call = channel.unary_stream(method)(b"\xff\xff\xff", timeout=10)
            with pytest.raises(grpc.RpcError) as err:
                list(call)
        else:
            with pytest.raises(grpc.RpcError) as err:
                channel.unary_unary(method)(b"\xff\xff\xff", timeout=10)
    assert err.value.code() == INVALID, err.value.details()
    assert "not a valid protobuf message" in err.value.details()
