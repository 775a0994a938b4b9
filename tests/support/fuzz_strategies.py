"""Hypothesis strategies that build requests for fuzzing the running service (tests/integration/test_fuzz_*).

They only generate: odd Unicode, numbers far outside every documented range, adapter references,
raw protobuf wire bytes (values the typed client could not send, and bytes that are no message at
all), and RegisterAdapter upload streams cut from a real module's files. What the server must
answer is the oracle's business (tests/support/fuzz_oracle.py).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import struct

from hypothesis import strategies as st

from plugboard.v1 import adapters_pb2 as apb
from plugboard.v1 import generation_pb2 as pb

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# ----- text ----------------------------------------------------------------------------------------

ODD_PIECES = (
    *("\x00", "\x01", "\x07", "\x1b[31m", "\x7f", "\x85", "\t", "\r\n", "\n", "\u2028", "\u2029"),  # control
    *("\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad"),  # zero-width and invisible
    *("\u202e", "\u202d", "\u200f", "\u061c", "\u05e9\u05dc\u05d5\u05dd", "\u0645\u0631\u062d\u0628\u0627"),
    *("\u0301", "e\u0301", "a\u0308\u0301\u0323\u032a", "\u20dd", "\u0489"),  # combining marks
    *("\U0001f600", "\U0001f469\u200d\U0001f4bb", "\U0001f44d\U0001f3fd", "\U0001d54f", "\U00010348"),
    *("\U0010fffd", "\U000e0041", "\ufffd", "\ufffe", "\uffff", "\ue000", "ß", "İ", "ﬃ", "東京"),
    # the tiny tokenizer's special tokens and chat-template syntax
    *("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_start|>system\n", "{{ messages }}", "{% raw %}"),
)
PLAIN_PIECES = ("The quick brown fox", " ", "a", "e", "the", "Paris", "0123456789", "hello world")

_CHAR = st.characters(codec="utf-8")  # any code point but the surrogates, which protobuf refuses
_PIECE = st.one_of(
    st.sampled_from(PLAIN_PIECES), st.sampled_from(ODD_PIECES), _CHAR, st.text(_CHAR, max_size=6)
)


def weighted(*options: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """Draw from one of the strategies, with odds in proportion to the weights (st.one_of gives each
    distinct strategy the same odds)."""
    indices = [i for i, (weight, _) in enumerate(options) for _ in range(weight)]
    return st.sampled_from(indices).flatmap(lambda i: options[i][1])


def odd_text(max_pieces: int = 10, *, min_pieces: int = 0) -> st.SearchStrategy[str]:
    """Short strings full of odd Unicode (never a surrogate: protobuf strings are UTF-8)."""
    return st.lists(_PIECE, min_size=min_pieces, max_size=max_pieces).map("".join)


def long_text(max_repeat: int = 1000) -> st.SearchStrategy[str]:
    """A short odd string repeated: up to a few hundred kB, cheap to generate."""
    return st.builds(lambda s, n: s * n, odd_text(4, min_pieces=1), st.integers(30, max_repeat))


def huge_text() -> st.SearchStrategy[str]:
    """Just over the 64 KiB --max-message-bytes of the fuzz tests' server, in UTF-8."""
    piece = odd_text(3, min_pieces=1).map(lambda s: s or "x")  # a piece may be empty
    return st.builds(lambda s, size: s * (size // len(s.encode()) + 1), piece, st.integers(66_000, 80_000))


# ----- numbers ---------------------------------------------------------------------------------------

F32_MAX, F32_TINY = 3.4028234663852886e38, 1.401298464324817e-45  # float32's largest, smallest subnormal
FLOAT32_EDGES = (0.0, -0.0, 1.0, -1.0, 0.5, 2.0, math.inf, -math.inf, math.nan, F32_MAX, -F32_MAX, F32_TINY)
FLOAT32_EDGES += (-F32_TINY, 1.1754943508222875e-38, 1.0000001192092896, 0.9999999403953552)  # 1 +- an ulp
# every float a proto `float` field can hold: NaN, infinities, -0.0, subnormals, the extremes
FLOAT32 = st.sampled_from(FLOAT32_EDGES) | st.floats(width=32)
UINT32 = st.sampled_from((0, 1, 2, 7, 8, 9, 64, 255, 256, 2**15, 2**16, 2**31 - 1, 2**31, 2**32 - 1))
UINT32 |= st.integers(0, 2**32 - 1)
INT32 = st.sampled_from((0, 1, -1, 2, 383, 384, 385, 2**15, 2**31 - 1, -(2**31)))
INT32 |= st.integers(-(2**31), 2**31 - 1)
UINT64 = st.sampled_from((0, 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1))
UINT64 |= st.integers(0, 2**64 - 1)


# ----- generation requests -------------------------------------------------------------------------

STOP_PIECES = ("a", "e", " ", "n", "\ufffd", "<|im_end|>", "\n", "the")
_GOOD_STOP = st.one_of(st.sampled_from(STOP_PIECES), odd_text(3, min_pieces=1))
_NONE = st.none()  # an optional field left unset


def stop_sequences() -> st.SearchStrategy[list[str]]:
    """Any stop list: empty strings, ones around the 256-character limit, around 16 of them."""
    stop = st.one_of(_GOOD_STOP, st.just(""), st.text(_CHAR, min_size=250, max_size=262))
    return st.one_of(st.just([]), st.lists(stop, max_size=4), st.lists(stop, min_size=14, max_size=20))


# Per field of GenerationParams: (values in its documented range, anything at all); None is unset.
PARAM_FIELDS = {
    "max_new_tokens": (None, UINT32),  # the valid range depends on the server: see generation_params
    "temperature": (st.one_of(st.just(0.0), st.floats(0, 2, width=32)), FLOAT32),
    "top_p": (_NONE | st.floats(0, 1, exclude_min=True, width=32), _NONE | FLOAT32),
    "top_k": (st.one_of(st.just(0), st.integers(1, 500)), INT32),
    "repetition_penalty": (_NONE | st.floats(0.5, 2, width=32), _NONE | FLOAT32),
    "seed": (_NONE | st.integers(0, 2**63 - 1), _NONE | UINT64),
    "stop": (st.lists(_GOOD_STOP, max_size=3), stop_sequences()),
}


@st.composite
def generation_params(draw: st.DrawFn, max_new_tokens: int) -> pb.GenerationParams | None:
    """GenerationParams (None: not set): all valid, one field wild, or every field wild."""
    if draw(st.integers(0, 9)) == 9:
        return None
    mode = draw(st.sampled_from(["valid", "valid", "one wild", "one wild", "all wild"]))
    wild = set(PARAM_FIELDS) if mode == "all wild" else set()
    if mode == "one wild":
        wild = {draw(st.sampled_from(sorted(PARAM_FIELDS)))}
    p = pb.GenerationParams(logprobs=draw(st.booleans()), ignore_eos=draw(st.booleans()))
    for name, (valid, anything) in PARAM_FIELDS.items():
        if name == "max_new_tokens" and name not in wild:
            valid = _NONE | st.integers(1, max_new_tokens)
        value = draw(anything if name in wild else valid)
        if name == "stop":
            p.stop.extend(value)
        elif value is not None:
            setattr(p, name, value)
    return p


ROLES = ("system", "user", "assistant")
ODD_ROLES = (
    "",
    "User",
    "USER",
    "user ",
    " user",
    "tool",
    "function",
    "assistant\x00",
    "system\u200b",
    "user\n",
)


@st.composite
def chat_messages(draw: st.DrawFn, min_size: int = 0) -> list[pb.ChatMessage]:
    """Mostly with valid roles; sometimes odd ones. Contents of any kind."""
    role = st.sampled_from(ROLES)
    if draw(st.integers(0, 3)) == 3:
        role = st.one_of(role, st.sampled_from(ODD_ROLES), odd_text(2))
    content = weighted((6, odd_text(6)), (1, long_text()))
    return draw(
        st.lists(st.builds(pb.ChatMessage, role=role, content=content), min_size=min_size, max_size=4)
    )


@st.composite
def prompt_or_messages(draw: st.DrawFn) -> tuple[str, list[pb.ChatMessage]]:
    """Mostly exactly one of the two (as the API wants), sometimes both or neither."""
    form = draw(st.sampled_from(["prompt"] * 5 + ["messages"] * 4 + ["both", "neither"]))
    text = weighted((16, odd_text(8, min_pieces=1)), (1, long_text()), (1, huge_text()))
    prompt = draw(text) if form in ("prompt", "both") else ""
    messages = (
        draw(chat_messages(min_size=1 if form == "messages" else 0)) if form in ("messages", "both") else []
    )
    return prompt, messages


SELECTORS = ("0", "2", "99", "99999999999999999999", "nope", "stable2", "latest", "", "-1", "v1.0")
SELECTORS += ("１", "²", "STABLE", "stable\n")  # a full-width digit and "²" pass str.isdigit()
REF_SUFFIXES = ("\n", " ", "\x00", "/", "/../x", "@", "@@1", "\u200b", "A", "\U0001f600", "@1@2", "@ 1")


def adapter_refs(existing: list[str], names: list[str]) -> st.SearchStrategy[str]:
    """ "" (the base model), refs that resolve, refs to missing versions / aliases / names, odd strings
    (none of them starting with one of `names`' "gen-" prefix, which only `existing` may use)."""
    name_like = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,70}", fullmatch=True)
    return weighted(
        (4, st.just("")),
        (4, st.sampled_from(existing)),
        (1, st.builds("{}@{}".format, st.sampled_from(names), st.sampled_from(SELECTORS))),
        (1, name_like.filter(lambda s: not s.startswith("gen-"))),
        (1, st.builds(str.__add__, st.sampled_from(names), st.sampled_from(REF_SUFFIXES))),
        (1, odd_text(6).filter(lambda s: not s.startswith("gen-"))),
    )


@st.composite
def generate_requests(
    draw: st.DrawFn, refs: st.SearchStrategy[str], max_new_tokens: int
) -> pb.GenerateRequest:
    prompt, messages = draw(prompt_or_messages())
    req = pb.GenerateRequest(prompt=prompt, messages=messages, adapter=draw(refs))
    params = draw(generation_params(max_new_tokens))
    if params is not None:
        req.params.CopyFrom(params)
    req.request_id = draw(st.one_of(st.just(""), odd_text(4), long_text(300)))
    return req


@st.composite
def score_requests(draw: st.DrawFn, refs: st.SearchStrategy[str]) -> pb.ScoreRequest:
    prompt, messages = draw(prompt_or_messages())
    good = st.one_of(st.sampled_from(PLAIN_PIECES), odd_text(4, min_pieces=1))
    choices = weighted(
        (4, st.lists(good, min_size=2, max_size=5)),
        (2, st.lists(st.one_of(good, st.just(""), long_text(300)), max_size=8)),
        (1, st.lists(st.sampled_from(PLAIN_PIECES), min_size=60, max_size=70)),  # around the limit of 64
    )
    return pb.ScoreRequest(
        prompt=prompt,
        messages=messages,
        choices=draw(choices),
        adapter=draw(refs),
        request_id=draw(st.one_of(st.just(""), odd_text(4))),
    )


def tokenize_requests() -> st.SearchStrategy[pb.TokenizeRequest]:
    return prompt_or_messages().map(lambda tm: pb.TokenizeRequest(text=tm[0], messages=tm[1]))


# ----- raw protobuf wire bytes --------------------------------------------------------------------

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5


def varint(n: int) -> bytes:
    """n as a protobuf varint (a negative number as its 64-bit two's complement: 10 bytes)."""
    n &= (1 << 64) - 1
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes([*out, n])


def wire_field(number: int, wire_type: int, payload: bytes = b"") -> bytes:
    if wire_type == LEN:
        payload = varint(len(payload)) + payload
    return varint(number << 3 | wire_type) + payload


def _any_int64() -> st.SearchStrategy[int]:
    return st.one_of(UINT64, st.integers(-(2**63), -1))


def unknown_fields(first_free: int) -> st.SearchStrategy[bytes]:
    """Fields the message does not define, of every wire type (parsers must keep or skip them)."""
    number = st.one_of(st.integers(first_free, 200), st.sampled_from((19000, 19999, 2**29 - 1)))

    def group(n: int, v: int) -> bytes:
        return wire_field(n, SGROUP) + wire_field(1, VARINT, varint(v)) + wire_field(n, EGROUP)

    return st.one_of(
        st.builds(lambda n, v: wire_field(n, VARINT, varint(v)), number, _any_int64()),
        st.builds(lambda n, b: wire_field(n, I64, b), number, st.binary(min_size=8, max_size=8)),
        st.builds(lambda n, b: wire_field(n, I32, b), number, st.binary(min_size=4, max_size=4)),
        st.builds(lambda n, b: wire_field(n, LEN, b), number, st.binary(max_size=40)),
        st.builds(group, number, _any_int64()),
    )


@st.composite
def raw_generation_params(draw: st.DrawFn) -> bytes:
    """GenerationParams on the wire: 64-bit and negative varints in its uint32 fields, any float bits
    (NaNs with payloads), repeated scalars (the last one wins), known fields with the wrong wire type."""
    float_bits = st.one_of(st.binary(min_size=4, max_size=4), FLOAT32.map(lambda f: struct.pack("<f", f)))
    entry = st.one_of(
        st.builds(
            lambda n, v: wire_field(n, VARINT, varint(v)), st.sampled_from((1, 4, 6, 8, 9)), _any_int64()
        ),
        st.builds(lambda n, b: wire_field(n, I32, b), st.sampled_from((2, 3, 5)), float_bits),
        st.builds(lambda s: wire_field(7, LEN, s.encode()), _GOOD_STOP),
        st.builds(lambda n, b: wire_field(n, I64, b), st.integers(1, 9), st.binary(min_size=8, max_size=8)),
        unknown_fields(10),
    )
    return b"".join(draw(st.lists(entry, max_size=12)))


@st.composite
def raw_generate_requests(draw: st.DrawFn, refs: st.SearchStrategy[str]) -> bytes:
    """A GenerateRequest as bytes: a valid base, raw params merged in, unknown fields around it; one
    in eight cut short or with garbage appended (most of those are no valid message at all)."""
    prompt, messages = draw(prompt_or_messages())
    base = pb.GenerateRequest(prompt=prompt, messages=messages, adapter=draw(refs)).SerializeToString()
    params = [wire_field(4, LEN, draw(raw_generation_params())) for _ in range(draw(st.integers(1, 2)))]
    raw = base + b"".join(params) + b"".join(draw(st.lists(unknown_fields(6), max_size=3)))
    if draw(st.integers(0, 7)) == 7:
        garbage = st.sampled_from((b"\xff", b"\xff\xff\xff", b"\x80", b"\x0a\x05ab", b"\x07", b"\x0c"))
        raw = raw[: draw(st.integers(0, len(raw)))] if draw(st.booleans()) else raw + draw(garbage)
    return raw


# ----- RegisterAdapter upload streams --------------------------------------------------------------

NAME_KEYS = ("a", "b", "c")  # the machine's names are "<prefix>-a" etc.
TAGS = ("demo", "prod", "t-1")
ALIASES = ("stable", "canary")
BAD_NAMES = ("", "../escape", "a/b", "A", "-x", ".x", "x" * 65, "\U0001f600", "a b", "a\x00", "a\n", "\na")
BAD_ALIASES = ("latest", "7", "A", "stable\n", "-x")
BAD_TAGS = ("", "A", "t\n", "a b")
BAD_FILE_NAMES = (
    *("", "../x.safetensors", "x/y.safetensors", ".safetensors", ".hidden.safetensors", "adapter_model.bin"),
    *("pytorch_model.bin", "README.md", "adapter_config.json.bak", "x.SAFETENSORS", "\u00e9.safetensors"),
    *("x\x00.safetensors", "x.safetensors\n", " x.safetensors"),
    *("a" * 117 + ".safetensors", "a" * 300 + ".safetensors"),  # 129 characters, and past 255 bytes
)
GOOD_EXTRA_FILES = ("extra.safetensors", "B.safetensors", "a_b-c.0.safetensors", "a" * 116 + ".safetensors")
HUGE_OFFSETS = (10**6, 2**32, 2**40, 2**62, 2**63, 2**64 - 1)


def chunk_message(filename: str, offset: int, data: bytes) -> apb.RegisterAdapterRequest:
    return apb.RegisterAdapterRequest(chunk=apb.FileChunk(filename=filename, offset=offset, data=data))


def _chance(draw: st.DrawFn, percent: int) -> bool:
    """True `percent`% of the time; shrinks to False (the plain, valid upload)."""
    return draw(st.integers(0, 99)) >= 100 - percent


def json_values() -> st.SearchStrategy[object]:
    finite = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from((-0.0, 1e308, 2.0**64))
    scalar = st.one_of(st.none(), st.booleans(), finite, odd_text(3))
    return st.recursive(
        scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(odd_text(2), c, max_size=3)
    )


def metadata_dicts(*, non_finite: bool) -> st.SearchStrategy[dict]:
    """JSON objects; with `non_finite`, a third of them hold a NaN or an infinity (which JSON cannot)."""
    plain = st.dictionaries(odd_text(3), json_values(), max_size=4)
    if not non_finite:
        return plain
    bad = st.builds(
        lambda d, k, v: {**d, k: v}, plain, odd_text(2), st.sampled_from((math.nan, math.inf, -math.inf))
    )
    return weighted((2, plain), (1, bad))


def _split(draw: st.DrawFn, data: bytes, max_chunks: int) -> list[tuple[int, bytes]]:
    """Cut data into chunks at random points: [(offset, bytes)] in file order."""
    if len(data) < 2:
        return [(0, data)]
    cuts = sorted(set(draw(st.lists(st.integers(1, len(data) - 1), max_size=max_chunks - 1))))
    return [(a, data[a:b]) for a, b in itertools.pairwise([0, *cuts, len(data)])]


@st.composite
def uploads(
    draw: st.DrawFn, modules: dict[str, dict[str, bytes]], names: list[str], *, clean: bool = False
) -> tuple[list[apb.RegisterAdapterRequest], list[str]]:
    """(a RegisterAdapter stream, notes on what was done to it) uploading one of `modules` (kind ->
    {file name: bytes}) as one of `names`: valid when `clean`; otherwise with a few of: chunks
    shuffled, duplicated, overlapping, gapped, at huge offsets, files missing or extra, bad names,
    NaN metadata, data past the declared size, a wrong manifest, a missing or doubled header."""
    fuzz = not clean
    notes: list[str] = []

    def chance(percent: int) -> bool:  # a mangling: never when clean
        return fuzz and _chance(draw, percent)

    source = draw(st.sampled_from(sorted(modules)))
    files = dict(modules[source])
    if chance(8):
        other = draw(st.sampled_from(sorted(set(modules) - {source})))
        files[WEIGHTS_FILE] = modules[other][WEIGHTS_FILE]
        notes.append(f"the config of {source}, the weights of {other}")

    header = apb.RegisterAdapterHeader(name=draw(st.sampled_from(names)))
    if chance(12):
        odd = odd_text(3).filter(lambda s: not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", s))  # not a name
        header.name = draw(st.sampled_from(BAD_NAMES) | odd)
    if _chance(draw, 30):
        header.alias = draw(st.sampled_from(ALIASES))
    if chance(10):
        header.alias = draw(st.one_of(st.sampled_from(BAD_ALIASES), odd_text(2)))
    if _chance(draw, 40):
        header.description = draw(odd_text() if clean else st.one_of(odd_text(), long_text()))
    if _chance(draw, 30):
        header.tags.extend(draw(st.lists(st.sampled_from(TAGS), max_size=3)))
    if chance(8):
        header.tags.append(draw(st.one_of(st.sampled_from(BAD_TAGS), odd_text(2))))
    if _chance(draw, 25):
        header.metadata.update(draw(metadata_dicts(non_finite=fuzz)))

    chunks: list[tuple[str, int, bytes]] = []
    for name, data in files.items():
        if chance(5):
            notes.append(f"no {name}")
            continue
        pieces = _split(draw, data, 6)
        if chance(10) and len(pieces) > 1:
            del pieces[draw(st.integers(0, len(pieces) - 1))]
            notes.append(f"a chunk of {name} dropped")
        if chance(10):
            pieces.append(draw(st.sampled_from(pieces)))
            notes.append(f"a chunk of {name} twice")
        if chance(10):
            i, shift = draw(st.integers(0, len(pieces) - 1)), draw(st.sampled_from((-3, -1, 1, 2, 17)))
            pieces[i] = (max(0, pieces[i][0] + shift), pieces[i][1])
            notes.append(f"a chunk of {name} shifted by {shift}")
        if chance(6):
            offset = draw(st.sampled_from((len(data), len(data) + 1, *HUGE_OFFSETS)))
            pieces.append((offset, draw(st.sampled_from((b"", b"x", b"\x00" * 10)))))
            notes.append(f"a chunk of {name} at {offset}")
        chunks.extend((name, o, d) for o, d in pieces)
    if chance(15):
        for _ in range(draw(st.integers(1, 2))):
            name = draw(st.one_of(st.sampled_from(GOOD_EXTRA_FILES), st.sampled_from(BAD_FILE_NAMES)))
            size = draw(st.sampled_from((0, 1, 100, 30_000, 40_000)))
            junk = (draw(st.binary(min_size=1, max_size=8)) * (size // 4 + 1))[:size]
            chunks.extend((name, o, d) for o, d in _split(draw, junk, 2))
            notes.append(f"an extra file {name!r} of {size} bytes")
    if draw(st.booleans()):
        chunks = draw(st.permutations(chunks))

    if _chance(draw, 40):  # a manifest
        manifest = [[n, len(d), hashlib.sha256(d).hexdigest()] for n, d in files.items()]
        if draw(st.booleans()):
            manifest = [[n, s, h.upper() if draw(st.booleans()) else ""] for n, s, h in manifest]
        if chance(30):
            entry = draw(st.sampled_from(manifest))
            how = draw(st.sampled_from(("size-1", "size+1", "huge", "sha", "another")))
            notes.append(f"manifest: {how} ({entry[0]})")
            if how == "another":  # the same name again, a bad one, or a file never sent
                other = (entry[0], "declared.safetensors", *BAD_FILE_NAMES)
                manifest.append([draw(st.sampled_from(other)), 10, ""])
            elif how == "sha":
                entry[2] = draw(st.sampled_from(("0" * 64, "zz", "\U0001f600")))
            else:
                entry[1] = {"size-1": entry[1] - 1, "size+1": entry[1] + 1, "huge": 2**64 - 1}[how]
        header.files.extend(apb.FileManifest(filename=n, size_bytes=s, sha256=h) for n, s, h in manifest)

    first = apb.RegisterAdapterRequest(header=header)
    messages = [first, *(chunk_message(*c) for c in chunks)]
    if chance(6):
        messages.insert(draw(st.integers(1, len(messages))), first)
        notes.append("the header twice")
    if chance(4):
        messages.insert(draw(st.integers(1, len(messages))), apb.RegisterAdapterRequest())
        notes.append("an empty message")
    if chance(5):
        messages.pop(0)
        notes.append("no header first")
        if messages and _chance(draw, 50):
            messages.insert(draw(st.integers(1, len(messages))), first)
    return messages, notes
