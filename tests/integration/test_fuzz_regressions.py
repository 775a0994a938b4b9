"""The bugs the fuzz tests found, one short request each. All are fixed; these keep them fixed.

(Undecodable request bytes, answered UNKNOWN before, are tests/integration/test_errors.py's.)
"""

from __future__ import annotations

import base64
import json
import math

import pytest
from google.protobuf import struct_pb2

from plugboard.v1 import adapters_pb2 as apb
from plugboard.v1 import generation_pb2 as pb
from tests.support.fuzz_strategies import chunk_message
from tests.support.fuzz_world import LIMITS, STABLE_NAMES, Answer, S, running, whole_upload


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    with running(tiny_model_dir, tmp_path_factory.mktemp("fuzz-regressions")) as w:
        yield w


def token(name: str, version: object) -> str:
    return base64.urlsafe_b64encode(json.dumps([name, version]).encode()).decode()


def nan_metadata() -> struct_pb2.Struct:
    metadata = struct_pb2.Struct()
    metadata.update({"accuracy": math.nan})
    return metadata


LISTINGS = {  # were: INTERNAL, or (page tokens the server never made) OK
    "a kind outside the enum": {"kind": 7},
    "a page token past SQLite's integers": {"page_token": token("zz", 2**63)},
    "a page token with a lone surrogate": {"page_token": token("\ud800", 1)},
    "a page token with no module's name": {"page_token": token("Zz", 1)},
    "a page token with a negative version": {"page_token": token("zz", -1)},
}
UPLOADS = {  # header fields, a chunk after the module's files, the field named; were: OK, or INTERNAL
    "a name with a trailing newline": ({"name": "regression\n"}, None, "name"),
    "an alias with a trailing newline": ({"alias": "stable\n"}, None, "alias"),
    "a tag with a trailing newline": ({"tags": ["t\n"]}, None, "tag"),
    "NaN in the metadata": ({"metadata": nan_metadata()}, None, "metadata"),
    "a chunk at offset 2^63": ({}, ("x.safetensors", 2**63), "offset"),
    "a chunk past the upload limit": ({}, ("x.safetensors", LIMITS["max_upload_bytes"]), "offset"),
    "a file name of 129 characters": ({}, ("a" * 117 + ".safetensors", 0), "filename"),
}


def refused(answer: Answer, field: str) -> bool:
    """INVALID_ARGUMENT, naming the field."""
    return answer.code == S.INVALID_ARGUMENT and answer.details.startswith(f"{field}: ")


@pytest.mark.parametrize("ref", ["gen-lora\n", "gen-lora@stable\n"])  # were: NOT_FOUND
def test_a_reference_with_a_trailing_newline(world, ref):
    answer = world.call("GetAdapter", apb.GetAdapterRequest(adapter=ref))
    assert refused(answer, "adapter"), answer


@pytest.mark.parametrize("fields", LISTINGS.values(), ids=LISTINGS)
def test_refused_listings(world, fields):
    answer = world.call("ListAdapters", apb.ListAdaptersRequest(**fields))
    assert refused(answer, next(iter(fields))), answer


@pytest.mark.parametrize(("header", "chunk", "field"), UPLOADS.values(), ids=UPLOADS)
def test_refused_uploads(world, header, chunk, field):
    messages = whole_upload(world.files["lora"], **{"name": "regression", **header})
    if chunk:
        messages.append(chunk_message(*chunk, b"x"))
    answer = world.call("RegisterAdapter", messages)
    assert refused(answer, field), answer


def test_a_module_that_can_never_get_a_slot_is_refused_at_once(world):
    """Every device slot pinned by other modules: refused, not left waiting out its deadline."""
    *pinned, other = STABLE_NAMES
    assert len(pinned) == LIMITS["max_loaded_adapters"]
    for name in pinned:
        assert world.call("LoadAdapter", apb.LoadAdapterRequest(adapter=name)).code == S.OK
    generate = pb.GenerateRequest(prompt="x", adapter=other, params=pb.GenerationParams(max_new_tokens=2))
    score = pb.ScoreRequest(prompt="x", choices=["a", "b"], adapter=other)
    try:
        for rpc, request in [("Generate", generate), ("GenerateStream", generate), ("Score", score)]:
            answer = world.call(rpc, request)
            assert (answer.code, "pinned" in answer.details) == (S.RESOURCE_EXHAUSTED, True), answer.details
        generate.adapter = pinned[0]
        assert world.call("Generate", generate).code == S.OK  # a pinned module still serves
    finally:
        for name in pinned:
            world.call("UnloadAdapter", apb.UnloadAdapterRequest(adapter=name))
    generate.adapter = other
    assert world.call("Generate", generate).code == S.OK
