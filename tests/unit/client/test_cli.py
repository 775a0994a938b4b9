"""The `plugboard` CLI: argument parsing and output, with a fake client injected in place of a server."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from plugboard.v1 import adapters_pb2
from plugboard.v1 import generation_pb2 as pb
from plugboard_client import cli
from plugboard_client.errors import NotFound, PlugboardError, Unavailable


class FakeClient:
    """Records calls; answers with canned responses; can fail on demand."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.closed = False
        self.stream_closed = False
        self.fail: PlugboardError | None = None
        self.stream_fail_after: int | None = None
        self.health_status = "SERVING"
        self.target: str | None = None
        self.timeout: float | None = None

    def close(self) -> None:
        self.closed = True

    def _record(self, name: str, **kwargs: Any) -> None:
        self.calls.append((name, kwargs))
        if self.fail is not None:
            raise self.fail

    def generate(self, prompt: str | None = None, **kwargs: Any) -> pb.GenerateResponse:
        self._record("generate", prompt=prompt, **kwargs)
        return pb.GenerateResponse(text="Paris.", finish_reason=pb.EOS, generated_tokens=2, seed=7)

    def generate_stream(
        self, prompt: str | None = None, **kwargs: Any
    ) -> Iterator[pb.GenerateStreamResponse]:
        self._record("generate_stream", prompt=prompt, **kwargs)
        return self._stream()

    def _stream(self) -> Iterator[pb.GenerateStreamResponse]:
        parts = [pb.GenerateStreamResponse(text=t) for t in ("Pa", "ris", ".")]
        parts.append(pb.GenerateStreamResponse(finish_reason=pb.EOS, generated_tokens=3))
        try:
            for i, part in enumerate(parts):
                if self.stream_fail_after is not None and i == self.stream_fail_after:
                    raise Unavailable("server went away")
                yield part
        finally:
            self.stream_closed = True

    def score(self, prompt: str | None = None, **kwargs: Any) -> pb.ScoreResponse:
        self._record("score", prompt=prompt, **kwargs)
        return pb.ScoreResponse(
            scores=[
                pb.ChoiceScore(choice=" positive", logprob=-0.1, probability=0.9, tokens=1),
                pb.ChoiceScore(choice=" negative", logprob=-2.3, probability=0.1, tokens=1),
            ],
            best=" positive",
        )

    def tokenize(self, text: str | None = None, **kwargs: Any) -> pb.TokenizeResponse:
        self._record("tokenize", text=text, **kwargs)
        return pb.TokenizeResponse(token_ids=[1, 42], tokens=["<s>", " hi"])

    def model_info(self) -> pb.ModelInfoResponse:
        self._record("model_info")
        return pb.ModelInfoResponse(
            model="default",
            dtype="bfloat16",
            max_new_tokens=2048,
            eos_token_ids=[2, 7],
            has_chat_template=True,
            adapter_kinds=[adapters_pb2.PREFIX, adapters_pb2.LORA],
        )

    def health(self, service: str = "") -> str:
        self._record("health", service=service)
        return self.health_status


@pytest.fixture
def fake() -> FakeClient:
    return FakeClient()


def run(fake: FakeClient, *argv: str) -> int:
    def factory(target: str, *, timeout: float | None = None) -> FakeClient:
        fake.target, fake.timeout = target, timeout
        return fake

    return cli.main(list(argv), client_factory=factory)  # type: ignore[arg-type]


def test_generate_sends_a_chat_message_by_default(
    fake: FakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(fake, "generate", "Capital of France?") == 0
    name, kwargs = fake.calls[0]
    assert name == "generate"
    assert kwargs["prompt"] is None
    assert kwargs["messages"] == [{"role": "user", "content": "Capital of France?"}]
    # Unset options stay None so the request leaves them unset and the server's defaults apply.
    assert kwargs["max_new_tokens"] is None and kwargs["top_p"] is None
    assert kwargs["repetition_penalty"] is None and kwargs["seed"] is None
    assert kwargs["temperature"] == 0.0 and kwargs["top_k"] == 0 and kwargs["stop"] == []
    assert kwargs["adapter"] == ""
    assert capsys.readouterr().out == "Paris.\n"
    assert fake.closed


def test_generate_system_message_comes_first(fake: FakeClient) -> None:
    run(fake, "generate", "hi", "--system", "Be brief.")
    assert fake.calls[0][1]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]


def test_generate_raw_sends_a_prompt(fake: FakeClient) -> None:
    run(fake, "generate", "--raw", "Once upon a time")
    kwargs = fake.calls[0][1]
    assert kwargs["prompt"] == "Once upon a time" and "messages" not in kwargs


def test_generate_options(fake: FakeClient) -> None:
    argv = ["generate", "x", "--adapter", "sent@2", "--max-new-tokens", "5", "--temperature", "0.8"]
    argv += ["--top-p", "0.9", "--top-k", "40", "--repetition-penalty", "1.2", "--seed", "3"]
    argv += ["--stop", "\n", "--stop", "END", "--logprobs"]
    run(fake, *argv)
    kwargs = fake.calls[0][1]
    assert kwargs["adapter"] == "sent@2" and kwargs["max_new_tokens"] == 5
    assert kwargs["temperature"] == 0.8 and kwargs["top_p"] == 0.9 and kwargs["top_k"] == 40
    assert kwargs["repetition_penalty"] == 1.2 and kwargs["seed"] == 3
    assert kwargs["stop"] == ["\n", "END"] and kwargs["logprobs"] is True


def test_generate_json(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    run(fake, "generate", "x", "--json")
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == "Paris." and out["finish_reason"] == "EOS"
    assert out["generated_tokens"] == 2 and out["prompt_tokens"] == 0  # defaults are shown too


def test_generate_stream_prints_deltas(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "generate", "x", "--stream") == 0
    assert fake.calls[0][0] == "generate_stream"
    assert capsys.readouterr().out == "Paris.\n"
    assert fake.stream_closed


def test_generate_stream_json_lines(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    run(fake, "generate", "x", "--stream", "--json")
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line.get("text", "") for line in lines] == ["Pa", "ris", ".", ""]
    assert lines[-1]["finish_reason"] == "EOS"


def test_stream_failure_ends_the_line_and_closes_the_stream(
    fake: FakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.stream_fail_after = 2
    assert run(fake, "generate", "x", "--stream") == 1
    captured = capsys.readouterr()
    assert captured.out == "Paris\n"
    assert captured.err == "error: UNAVAILABLE: server went away\n"
    assert fake.stream_closed and fake.closed


def test_text_dash_reads_stdin(fake: FakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("from a pipe\n"))
    run(fake, "generate", "--raw", "-")
    assert fake.calls[0][1]["prompt"] == "from a pipe\n"


def test_score_output_marks_the_best(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "score", "Great film!", "--choices", " positive, negative", "--adapter", "s") == 0
    name, kwargs = fake.calls[0]
    assert name == "score"
    assert kwargs["choices"] == [" positive", " negative"]  # verbatim: leading spaces matter
    assert kwargs["adapter"] == "s"
    assert kwargs["messages"] == [{"role": "user", "content": "Great film!"}]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("* ' positive'") and "p=0.9000" in lines[0] and "logprob=-0.1000" in lines[0]
    assert lines[1].startswith("  ' negative'") and "p=0.1000" in lines[1]


def test_score_raw_and_json(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    run(fake, "score", "--raw", "Review:", "--choices", "a,b", "--json")
    assert fake.calls[0][1]["prompt"] == "Review:"
    out = json.loads(capsys.readouterr().out)
    assert out["best"] == " positive" and len(out["scores"]) == 2


def test_score_needs_choices(fake: FakeClient) -> None:
    with pytest.raises(SystemExit) as info:
        run(fake, "score", "x")
    assert info.value.code == 2


def test_tokenize(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    run(fake, "tokenize", "--raw", "hi")
    assert fake.calls[0] == ("tokenize", {"text": "hi"})
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["1", "'<s>'"] and out[1].split() == ["42", "'", "hi'"]
    assert out[-1] == "2 tokens"


def test_tokenize_uses_the_chat_template_by_default(fake: FakeClient) -> None:
    run(fake, "tokenize", "hi")
    assert fake.calls[0][1]["messages"] == [{"role": "user", "content": "hi"}]


def test_info_is_human_readable(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(fake, "info") == 0
    lines = capsys.readouterr().out.splitlines()
    assert "model: default" in lines
    assert "dtype: bfloat16" in lines
    assert "max_new_tokens: 2048" in lines
    assert "eos_token_ids: 2, 7" in lines
    assert "has_chat_template: true" in lines
    assert "adapter_kinds: PREFIX, LORA" in lines
    assert "quantization: " in lines  # every field is listed, set or not


def test_info_json(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    run(fake, "info", "--json")
    out = json.loads(capsys.readouterr().out)
    assert out["adapter_kinds"] == ["PREFIX", "LORA"] and out["max_new_tokens"] == 2048


@pytest.mark.parametrize(("status", "rc"), [("SERVING", 0), ("NOT_SERVING", 1)])
def test_health(fake: FakeClient, capsys: pytest.CaptureFixture[str], status: str, rc: int) -> None:
    fake.health_status = status
    assert run(fake, "health") == rc
    assert capsys.readouterr().out == f"{status}\n"
    assert fake.calls[0] == ("health", {"service": ""})


def test_rpc_errors_print_code_and_details(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    fake.fail = NotFound("no adapter 'x'")
    assert run(fake, "generate", "hi", "--adapter", "x") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "error: NOT_FOUND: no adapter 'x'\n"
    assert fake.closed


def test_base_error_class_prints_its_code(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    fake.fail = PlugboardError("conflict", code=grpc.StatusCode.ABORTED)
    assert run(fake, "info") == 1
    assert capsys.readouterr().err == "error: ABORTED: conflict\n"


def test_target_and_timeout(fake: FakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PLUGBOARD_TARGET", raising=False)
    run(fake, "health")
    assert fake.target == "127.0.0.1:50051" and fake.timeout is None
    monkeypatch.setenv("PLUGBOARD_TARGET", "gpu-box:6000")
    run(fake, "health")
    assert fake.target == "gpu-box:6000"
    run(fake, "--target", "other:1", "--timeout", "2.5", "health")
    assert fake.target == "other:1" and fake.timeout == 2.5


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nonsense"],
        ["generate"],
        ["generate", "x", "--max-new-tokens", "many"],
        ["generate", "x", "--raw", "--system", "s"],
    ],
)
def test_usage_errors_exit_2(fake: FakeClient, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run(fake, *argv)
    assert info.value.code == 2
    assert fake.calls == []


def test_broken_pipe_exits_quietly(fake: FakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> pb.GenerateResponse:
        raise BrokenPipeError

    monkeypatch.setattr(fake, "generate", broken)
    assert run(fake, "generate", "x") == 141
