"""The fuzz tests' server ("the world"), how they talk to it, and the check that it survived them.

Each fuzz test module starts its own server on the tiny model, with small limits and an admin
token, and registers three real modules as gen-prefix, gen-prompt and gen-lora (version 1, alias
stable). Every request goes through `World.call` (or `World.raw`), which returns the status as an
Answer instead of raising and counts requests per test and answers per RPC. `running()` ends with
the end check: the server still SERVING, its greedy answers what they were before the fuzzing,
nothing queued or running, nothing left in staging.

Settings: derandomized (the same examples on every run, for CI). `HYPOTHESIS_PROFILE=random` draws
new ones on each run, `PLUGBOARD_FUZZ_SCALE=10` runs ten times as many; a failure prints the blob to
replay it with @reproduce_failure.
"""

from __future__ import annotations

import copy
import json
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, settings

from plugboard.v1 import adapters_pb2 as apb
from plugboard.v1 import adapters_pb2_grpc, generation_pb2_grpc
from plugboard.v1 import generation_pb2 as pb
from plugboard_server.engine.prompt import encode_prompt
from plugboard_server.models.loading import load_model
from tests.support import fuzz_strategies as fz
from tests.support import peft_modules as pm
from tests.support.server import ServerThread, server_config

settings.register_profile(
    "fuzz",
    deadline=None,
    database=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
settings.register_profile("random", parent=settings.get_profile("fuzz"), derandomize=False)


def fuzz_settings(examples: int, **kw: Any) -> settings:
    examples *= int(os.environ.get("PLUGBOARD_FUZZ_SCALE", "1"))
    profile = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "fuzz"))
    return settings(profile, max_examples=examples, **kw)


S = grpc.StatusCode
TOKEN = "fuzz-admin-token"
TIMEOUT = 30  # generous: hitting it means the server hung
LIMITS = dict(
    max_new_tokens=8,
    default_max_new_tokens=4,
    max_input_tokens=128,
    max_upload_bytes=48 * 1024,
    max_message_bytes=64 * 1024,
    max_loaded_adapters=2,  # fewer device slots than modules: evictions, and every slot pinned
    max_batch_size=4,
)
KINDS = {"prefix": apb.PREFIX, "prompt": apb.PROMPT, "lora": apb.LORA}
STABLE_NAMES = [f"gen-{k}" for k in KINDS]  # registered once, never touched by the registry fuzzing
STABLE_REFS = [f"{n}{s}" for n in STABLE_NAMES for s in ("", "@1", "@stable", "@latest")]
BASELINE = pb.GenerateRequest(
    prompt="The quick brown fox", params=pb.GenerationParams(max_new_tokens=8, ignore_eos=True, logprobs=True)
)
GENERATION_RPCS = {"Generate", "GenerateStream", "Score", "Tokenize", "ModelInfo"}
AUTH = {  # how an admin call authenticates
    "ok": [("authorization", f"Bearer {TOKEN}")],
    "none": None,
    "wrong": [("authorization", "Bearer nope")],
    "case": [("authorization", f"bearer {TOKEN}")],
}


@dataclass
class Answer:
    code: grpc.StatusCode
    details: str = ""
    response: Any = None  # the response message, or a stream's messages


@dataclass
class World:
    server: ServerThread
    channel: grpc.Channel
    tokenizer: Any
    files: dict[str, dict[str, bytes]]  # kind -> {file name: bytes} of a real module
    info: pb.ModelInfoResponse = field(default_factory=pb.ModelInfoResponse)
    baseline: dict[str, pb.GenerateResponse] = field(default_factory=dict)
    pinned: set[str] = field(default_factory=set)  # "name@version" of every module LoadAdapter pinned
    sent: Counter = field(default_factory=Counter)  # requests per test
    answers: Counter = field(default_factory=Counter)  # (rpc, status) -> how many

    def __post_init__(self) -> None:
        self.gen = generation_pb2_grpc.GenerationStub(self.channel)
        self.adapters = adapters_pb2_grpc.AdaptersStub(self.channel)

    def call(self, rpc: str, request: Any, auth: str = "ok") -> Answer:
        """Any RPC by name; a stream's messages are collected, RegisterAdapter takes a list."""
        method = getattr(self.gen if rpc in GENERATION_RPCS else self.adapters, rpc)
        if rpc == "RegisterAdapter":
            request = iter(request)
        return self._answer(rpc, lambda: method(request, timeout=TIMEOUT, metadata=AUTH[auth]))

    def raw(self, rpc: str, data: bytes, response_type: Any) -> Answer:
        """A unary Generation RPC with request bytes as they are."""
        method = self.channel.unary_unary(
            f"/plugboard.v1.Generation/{rpc}", response_deserializer=response_type.FromString
        )
        return self._answer(rpc, lambda: method(data, timeout=TIMEOUT))

    def call_at_once(self, rpc: str, requests: list[Any]) -> list[Answer]:
        """Unary requests sent together, so that they share batches."""
        futures = [getattr(self.gen, rpc).future(r, timeout=TIMEOUT) for r in requests]
        return [self._answer(rpc, f.result) for f in futures]

    def _answer(self, rpc: str, send: Any) -> Answer:
        current = os.environ.get("PYTEST_CURRENT_TEST", "?")  # "path::test_name[params] (call)"
        self.sent[current.split("::")[-1].split("[")[0].split(" (")[0]] += 1
        try:
            response = send()
            answer = Answer(S.OK, "", list(response) if rpc == "GenerateStream" else response)
        except grpc.RpcError as e:
            answer = Answer(e.code(), e.details() or "")
        self.answers[rpc, answer.code.name] += 1
        return answer

    def encode(self, prompt: str, messages: Any) -> list[int]:
        """What the server tokenizes, with a tokenizer of our own."""
        return encode_prompt(self.tokenizer, prompt, messages)

    def greedy(self, adapter: str) -> pb.GenerateResponse:
        request = copy.deepcopy(BASELINE)
        request.adapter = adapter
        return self.gen.Generate(request, timeout=TIMEOUT)


def whole_upload(files: dict[str, bytes], **header: Any) -> list[apb.RegisterAdapterRequest]:
    """A plain RegisterAdapter stream: the header, then each file in one chunk."""
    first = apb.RegisterAdapterRequest(header=apb.RegisterAdapterHeader(**header))
    return [first, *(fz.chunk_message(n, 0, d) for n, d in files.items())]


def _module_files(directory: Path) -> dict[str, bytes]:
    """The module's two files; the config without the temporary directory it names, so that the
    files (and the chunk boundaries drawn from their sizes) are the same on every run."""
    config = json.loads((directory / fz.CONFIG_FILE).read_text())
    config["base_model_name_or_path"] = "tiny-llama"
    return {
        fz.CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True).encode(),
        fz.WEIGHTS_FILE: (directory / fz.WEIGHTS_FILE).read_bytes(),
    }


@contextmanager
def running(tiny_model_dir: Path, root: Path) -> Iterator[World]:
    """A world for one test module; the end check when the module is done.

    The server gets a model object of its own: an engine wraps the model's layers for LoRA, and the
    wrappers of an earlier server on a shared model object keep adding that server's last LoRA
    delta until the next server wraps the layers again.
    """
    tiny_model = load_model(str(tiny_model_dir), device="cpu")
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    made = {
        "prefix": pm.prefix(tiny_model_dir, root / "prefix", tokens=4, seed=21),
        "prompt": pm.prompt_tuning(tiny_model_dir, root / "prompt", tokens=3, seed=22),
        "lora": pm.lora(tiny_model_dir, root / "lora", targets=["q_proj", "v_proj"], r=2, seed=23),
    }
    config = server_config(registry=root / "registry", admin_token_file=token_file, **LIMITS)
    server = ServerThread(config, loader=lambda: tiny_model).start()
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    w = World(
        server=server,
        channel=grpc.insecure_channel(server.target, options=options),
        tokenizer=copy.deepcopy(tiny_model.tokenizer),
        files={k: _module_files(d) for k, d in made.items()},
    )
    try:
        w.info = w.gen.ModelInfo(pb.ModelInfoRequest(), timeout=TIMEOUT)
        for kind, files in w.files.items():
            info = w.adapters.RegisterAdapter(
                iter(whole_upload(files, name=f"gen-{kind}", alias="stable")),
                timeout=TIMEOUT,
                metadata=AUTH["ok"],
            )
            assert info.ref == f"gen-{kind}@1"
        w.baseline = {adapter: w.greedy(adapter) for adapter in ["", *STABLE_NAMES]}
        yield w
        check_survived(w)
    finally:
        print(f"\nrequests sent: {dict(w.sent)}, {sum(w.sent.values())} in all")
        print("answers:", ", ".join(f"{rpc} {code}: {n}" for (rpc, code), n in sorted(w.answers.items())))
        w.channel.close()
        server.stop()


def check_survived(w: World) -> None:
    health = health_pb2_grpc.HealthStub(w.channel)
    for service in ("", "plugboard.v1.Generation", "plugboard.v1.Adapters"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT).status
        assert status == health_pb2.HealthCheckResponse.SERVING, service
    for adapter, before in w.baseline.items():
        after = w.greedy(adapter)
        assert (after.text, list(after.logprobs), after.adapter) == (
            before.text,
            list(before.logprobs),
            before.adapter,
        ), f"greedy output changed for {adapter or 'the base model'}"
    engine = w.server.server.engine
    assert engine.running == 0 and engine.waiting == 0, "requests left in the batch or queue"
    staging = Path(w.server.server.config.registry) / "staging"
    assert not any(staging.iterdir()), "an upload left its staging directory behind"
