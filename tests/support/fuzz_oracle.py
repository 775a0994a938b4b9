"""The fuzz tests' oracle: the one status code the server must answer to a request.

The rules are docs/api.md's and docs/registry.md's, applied in the order the server checks them, so
that a request with several problems gets the code of the first; a wrong code fails, and so does
INTERNAL or UNKNOWN (which the oracle never expects). The codes the oracle may expect of an RPC are
docs/api.md's status table (one table for all RPCs), plus the two auth codes for the admin RPCs
(docs/registry.md, "Admin auth").
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import struct_pb2
from hypothesis import event

from plugboard.v1 import adapters_pb2 as apb
from plugboard.v1 import generation_pb2 as pb
from tests.support import fuzz_strategies as fz
from tests.support.fuzz_world import LIMITS, STABLE_REFS, Answer, S, World

DOCUMENTED = {
    S.OK,
    S.INVALID_ARGUMENT,
    S.NOT_FOUND,
    S.FAILED_PRECONDITION,
    S.RESOURCE_EXHAUSTED,
    S.UNAVAILABLE,
    S.CANCELLED,
    S.DEADLINE_EXCEEDED,
}
ADMIN_RPCS = {"RegisterAdapter", "DeleteAdapter", "SetAlias", "LoadAdapter", "UnloadAdapter"}
NAME = r"[a-z0-9][a-z0-9._-]{0,63}"  # docs/registry.md
NAME_RE = re.compile(NAME)
MAX_FILES, MAX_FILENAME = 8, 128  # an upload's files, a file name's characters


@dataclass(frozen=True)
class Expect:
    code: grpc.StatusCode = S.OK
    why: str = "a valid request"


def check(rpc: str, answer: Answer, expect: Expect) -> bool:
    """Assert the answer has the expected code (and details, if an error); True if it is OK."""
    documented = DOCUMENTED | ({S.UNAUTHENTICATED, S.PERMISSION_DENIED} if rpc in ADMIN_RPCS else set())
    assert expect.code in documented, f"the oracle expects an undocumented {expect.code} ({expect.why})"
    event(f"{rpc}: {answer.code.name}")
    assert answer.code == expect.code, (
        f"{rpc}: got {answer.code.name} ({answer.details!r}), expected {expect.code.name}: {expect.why}"
    )
    assert answer.code == S.OK or answer.details.strip(), f"{rpc}: {answer.code.name} with empty details"
    return answer.code == S.OK


def name_ok(name: str) -> bool:
    return NAME_RE.fullmatch(name) is not None


def ref_ok(ref: str) -> bool:
    """name, name@7 or name@alias."""
    name, at, selector = ref.partition("@")
    return name_ok(name) and (not at or name_ok(selector) or (selector.isascii() and selector.isdigit()))


def alias_ok(alias: str) -> bool:
    return name_ok(alias) and not alias.isdigit() and alias != "latest"


def filename_ok(name: str) -> bool:
    """docs/registry.md: adapter_config.json and *.safetensors only, by plain file name."""
    plain = re.fullmatch(r"[A-Za-z0-9._-]+", name) is not None and len(name) <= MAX_FILENAME
    return name == fz.CONFIG_FILE or (name.endswith(".safetensors") and not name.startswith(".") and plain)


def auth_expect(how: str) -> Expect | None:
    """An admin call's answer when its token is missing or wrong (checked before anything else)."""
    if how == "none":
        return Expect(S.UNAUTHENTICATED, "no token")
    if how in ("wrong", "case"):
        return Expect(S.PERMISSION_DENIED, "a wrong token")
    return None


def too_big(message: Any) -> Expect | None:
    if message.ByteSize() > LIMITS["max_message_bytes"]:
        return Expect(S.RESOURCE_EXHAUSTED, "the message is over --max-message-bytes")
    return None


# ----- Generation ---------------------------------------------------------------------------------


def resolve_stable(ref: str) -> tuple[Expect | None, str]:
    """(the answer an adapter reference alone forces, or None; the key it resolves to), for the
    generation tests' modules: gen-<kind> has version 1 only, with the alias stable."""
    if not ref:
        return None, ""
    if ref in STABLE_REFS:
        return None, ref.partition("@")[0] + "@1"
    if ref_ok(ref):
        return Expect(S.NOT_FOUND, f"no module {ref!r}"), ""
    return Expect(S.INVALID_ARGUMENT, f"malformed module reference {ref!r}"), ""


def slots_exhausted(w: World, key: str) -> Expect | None:
    """Every device slot pinned by LoadAdapter, none by `key`: refused at once, not left waiting."""
    if key and key not in w.pinned and len(w.pinned) >= LIMITS["max_loaded_adapters"]:
        return Expect(S.RESOURCE_EXHAUSTED, f"every device slot is pinned by others than {key}")
    return None


def input_problem(prompt: str, messages: Any) -> str | None:
    if prompt and messages:
        return "both prompt and messages"
    if not prompt and not messages:
        return "neither prompt nor messages"
    bad = [m.role for m in messages if m.role not in fz.ROLES]
    return f"role {bad[0]!r}" if bad else None


def params_problem(p: pb.GenerationParams) -> str | None:
    """docs/api.md's GenerationParams table."""
    finite = math.isfinite
    if p.HasField("max_new_tokens") and not 1 <= p.max_new_tokens <= LIMITS["max_new_tokens"]:
        return f"max_new_tokens {p.max_new_tokens}"
    if not (finite(p.temperature) and p.temperature >= 0):
        return f"temperature {p.temperature}"
    if p.HasField("top_p") and not (finite(p.top_p) and 0 < p.top_p <= 1):
        return f"top_p {p.top_p}"
    if p.top_k < 0:
        return f"top_k {p.top_k}"
    if p.HasField("repetition_penalty") and not (finite(p.repetition_penalty) and p.repetition_penalty > 0):
        return f"repetition_penalty {p.repetition_penalty}"
    if p.HasField("seed") and p.seed > 2**63 - 1:
        return f"seed {p.seed}"
    if len(p.stop) > 16 or any(not s or len(s) > 256 for s in p.stop):
        return "over 16 stop sequences, an empty one or one over 256 characters"
    return None


@dataclass
class Case:
    """What a generation request must get; for an OK, what the answer must say."""

    expect: Expect
    adapter: str = ""  # the key it resolves to
    prompt_tokens: int = 0
    max_new_tokens: int = 0
    choice_tokens: list[int] = field(default_factory=list)


def expect_generate(w: World, req: pb.GenerateRequest, resolve: Any = resolve_stable) -> Case:
    if expect := too_big(req):
        return Case(expect)
    expect, key = resolve(req.adapter)
    if expect:
        return Case(expect)
    if problem := input_problem(req.prompt, req.messages) or params_problem(req.params):
        return Case(Expect(S.INVALID_ARGUMENT, problem))
    if expect := slots_exhausted(w, key):
        return Case(expect)
    n = len(w.encode(req.prompt, req.messages))
    p = req.params
    max_new = p.max_new_tokens if p.HasField("max_new_tokens") else LIMITS["default_max_new_tokens"]
    if n == 0 or n > LIMITS["max_input_tokens"] or n + max_new > w.info.max_context_tokens:
        return Case(Expect(S.INVALID_ARGUMENT, f"a prompt of {n} tokens"))
    return Case(Expect(), key, n, max_new)


def expect_score(w: World, req: pb.ScoreRequest, resolve: Any = resolve_stable) -> Case:
    if expect := too_big(req):
        return Case(expect)
    expect, key = resolve(req.adapter)
    if expect:
        return Case(expect)
    problem = input_problem(req.prompt, req.messages)
    if not problem and not 2 <= len(req.choices) <= 64:
        problem = f"{len(req.choices)} choices"
    if not problem and not all(req.choices):
        problem = "an empty choice"
    if problem:
        return Case(Expect(S.INVALID_ARGUMENT, problem))
    if expect := slots_exhausted(w, key):
        return Case(expect)
    n = len(w.encode(req.prompt, req.messages))
    lengths = [len(w.tokenizer.encode(c, add_special_tokens=False)) for c in req.choices]
    if n == 0 or n > LIMITS["max_input_tokens"] or n + max(lengths) > w.info.max_context_tokens:
        return Case(Expect(S.INVALID_ARGUMENT, f"a prompt of {n} tokens, choices of up to {max(lengths)}"))
    return Case(Expect(), key, n, choice_tokens=lengths)


def expect_tokenize(w: World, req: pb.TokenizeRequest) -> tuple[Expect, pb.TokenizeResponse]:
    """The expected answer, and for an OK the response."""
    if expect := too_big(req):
        return expect, pb.TokenizeResponse()
    if problem := input_problem(req.text, req.messages):
        return Expect(S.INVALID_ARGUMENT, problem), pb.TokenizeResponse()
    ids = w.encode(req.text, req.messages)
    tokens = w.tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)
    response = pb.TokenizeResponse(token_ids=ids, tokens=tokens)
    return too_big(response) or Expect(), response


# ----- Adapters -----------------------------------------------------------------------------------


@dataclass
class Upload:
    """What RegisterAdapter must answer; for an OK, which module arrived and its files."""

    expect: Expect
    kind: str = ""
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class _File:
    size: int | None = None  # declared in the manifest
    sha256: str = ""
    ranges: list[tuple[int, int]] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)


def expect_upload(w: World, messages: list[apb.RegisterAdapterRequest]) -> Upload:
    """docs/registry.md's upload rules, message by message as the server reads them."""

    def invalid(why: str) -> Upload:
        return Upload(Expect(S.INVALID_ARGUMENT, why))

    if not messages or not messages[0].HasField("header"):
        return invalid("the first message must be the header")
    if expect := too_big(messages[0]):
        return Upload(expect)
    header = messages[0].header
    if not name_ok(header.name):
        return invalid(f"name {header.name!r}")
    if header.alias and not alias_ok(header.alias):
        return invalid(f"alias {header.alias!r}")
    if _non_finite(header.metadata):
        return invalid("metadata with NaN or Infinity (not JSON)")
    max_bytes = LIMITS["max_upload_bytes"]
    files: dict[str, _File] = {}
    for m in header.files:
        if not filename_ok(m.filename) or m.filename in files or m.size_bytes > max_bytes:
            return invalid(f"manifest entry {m.filename!r} ({m.size_bytes} bytes)")
        files[m.filename] = _File(m.size_bytes or None, m.sha256.lower())
    total = 0
    for message in messages[1:]:
        assert not too_big(message), "the generator made a chunk over --max-message-bytes"
        if not message.HasField("chunk"):
            return invalid("only one header, then chunks")
        name, start, data = message.chunk.filename, message.chunk.offset, message.chunk.data
        end = start + len(data)
        if not filename_ok(name):
            return invalid(f"file {name!r}")
        if name not in files and len(files) >= MAX_FILES:
            return invalid(f"more than {MAX_FILES} files")
        f = files.setdefault(name, _File())
        if end > max_bytes:
            return invalid(f"{name}: data at offset {start} ends past --max-upload-bytes")
        if f.size is not None and end > f.size:
            return invalid(f"{name}: data past its declared size")
        if any(a < end and start < b for a, b in f.ranges):  # half-open ranges intersect
            return invalid(f"{name}: overlapping chunks")
        total += len(data)
        if total > max_bytes:
            return invalid("over --max-upload-bytes in all")
        if data:
            f.data.extend(bytes(max(0, end - len(f.data))))
            f.data[start:end] = data
        f.ranges.append((start, end))
    if not files.get(fz.CONFIG_FILE, _File()).ranges:
        return invalid("no adapter_config.json")
    if not any(n.endswith(".safetensors") and f.ranges for n, f in files.items()):
        return invalid("no .safetensors")
    for name, f in files.items():
        if not f.ranges or sum(b - a for a, b in f.ranges) != len(f.data):
            return invalid(f"{name}: declared but not sent, or with gaps")
        if f.size is not None and len(f.data) != f.size:
            return invalid(f"{name}: not its declared size")
        if f.sha256 and hashlib.sha256(f.data).hexdigest() != f.sha256:
            return invalid(f"{name}: checksum")
    arrived = {n: bytes(f.data) for n, f in files.items()}
    kind = next((k for k, real in w.files.items() if _same_module(arrived, real)), "")
    if not kind:
        return Upload(Expect(S.FAILED_PRECONDITION, "not a module for this base model"))
    if not all(name_ok(t) for t in header.tags):
        return invalid(f"tags {list(header.tags)!r}")
    return Upload(Expect(), kind, arrived)


def _same_module(arrived: dict[str, bytes], real: dict[str, bytes]) -> bool:
    """The same config (as JSON) and weights; extra .safetensors files do not matter."""
    try:
        config = json.loads(arrived[fz.CONFIG_FILE])
    except ValueError:  # UnicodeDecodeError included
        return False
    return (
        config == json.loads(real[fz.CONFIG_FILE]) and arrived.get(fz.WEIGHTS_FILE) == real[fz.WEIGHTS_FILE]
    )


def _non_finite(s: struct_pb2.Struct) -> bool:
    def value(v: struct_pb2.Value) -> bool:
        which = v.WhichOneof("kind")
        if which == "number_value":
            return not math.isfinite(v.number_value)
        if which == "struct_value":
            return _non_finite(v.struct_value)
        return which == "list_value" and any(value(x) for x in v.list_value.values)

    return any(value(v) for v in s.fields.values())


def decode_token(token: str) -> tuple[str, int] | None:
    """The (name, version) a page token lists after ("" for the first page), or None if it is not
    a token the server can have issued: base64 of [a valid name, a version in 0 .. 2^63-1]."""
    if not token:
        return "", 0
    try:
        value = json.loads(base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True))
    except (ValueError, UnicodeError):  # binascii.Error and JSONDecodeError are ValueErrors
        return None
    if isinstance(value, list) and len(value) == 2:
        name, version = value
        if isinstance(name, str) and name_ok(name) and type(version) is int and 0 <= version < 2**63:
            return name, version
    return None
