"""Building the RegisterAdapter stream: header then chunks, offsets, checksums, file selection, refusals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from google.protobuf import json_format

from plugboard.v1 import adapters_pb2 as apb
from plugboard_client import Client
from plugboard_client.adapters import adapter_dict, kind_value, list_request, upload_requests

CONFIG = json.dumps({"peft_type": "LORA", "r": 8}).encode()
WEIGHTS = bytes(range(256)) * 3 + b"tail"  # 772 bytes: not a multiple of the chunk size


def _adapter_dir(root: Path, **files: bytes) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    d = _adapter_dir(
        tmp_path / "sent",
        **{"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS, "README.md": b"# notes"},
    )
    # Neither of these is sent: a pickle next to the safetensors, and a hidden file.
    (d / "training_args.bin").write_bytes(b"pickle")
    (d / ".adapter_model.safetensors").write_bytes(b"resource fork")
    (d / "checkpoint-10").mkdir()
    (d / "checkpoint-10" / "adapter_model.safetensors").write_bytes(b"older")
    return d


def _split(msgs: list[apb.RegisterAdapterRequest]) -> tuple[apb.RegisterAdapterHeader, list[apb.FileChunk]]:
    assert msgs[0].WhichOneof("item") == "header"
    assert all(m.WhichOneof("item") == "chunk" for m in msgs[1:])
    return msgs[0].header, [m.chunk for m in msgs[1:]]


def test_header_first_then_each_file_in_order(adapter_dir: Path) -> None:
    header, chunks = _split(list(upload_requests(adapter_dir, name="sent", chunk_size=100)))
    assert header.name == "sent"
    assert [f.filename for f in header.files] == ["adapter_config.json", "adapter_model.safetensors"]
    assert [f.size_bytes for f in header.files] == [len(CONFIG), len(WEIGHTS)]
    assert [f.sha256 for f in header.files] == [
        hashlib.sha256(CONFIG).hexdigest(),
        hashlib.sha256(WEIGHTS).hexdigest(),
    ]
    # Only the allowed top-level files, each whole, one file after the other.
    assert [c.filename for c in chunks] == ["adapter_config.json"] + ["adapter_model.safetensors"] * 8
    weights = [c for c in chunks if c.filename == "adapter_model.safetensors"]
    assert [c.offset for c in weights] == list(range(0, len(WEIGHTS), 100))
    assert all(len(c.data) == 100 for c in weights[:-1]) and len(weights[-1].data) == 72
    assert b"".join(c.data for c in weights) == WEIGHTS
    assert chunks[0].offset == 0 and chunks[0].data == CONFIG


def test_exact_multiple_of_the_chunk_size_sends_no_empty_tail(tmp_path: Path) -> None:
    d = _adapter_dir(tmp_path, **{"adapter_config.json": b"{}", "a.safetensors": b"x" * 20})
    _, chunks = _split(list(upload_requests(d, name="m", chunk_size=10)))
    assert [(c.filename, c.offset, len(c.data)) for c in chunks] == [
        ("adapter_config.json", 0, 2),
        ("a.safetensors", 0, 10),
        ("a.safetensors", 10, 10),
    ]


def test_an_empty_file_still_sends_one_chunk(tmp_path: Path) -> None:
    # The server refuses a file listed in the header for which no chunk arrived.
    d = _adapter_dir(tmp_path, **{"adapter_config.json": b"{}", "a.safetensors": b""})
    header, chunks = _split(list(upload_requests(d, name="m")))
    assert header.files[1].size_bytes == 0
    assert header.files[1].sha256 == hashlib.sha256(b"").hexdigest()
    assert [(c.filename, c.offset, c.data) for c in chunks][1:] == [("a.safetensors", 0, b"")]


def test_several_weight_files_are_sent_sorted_after_the_config(tmp_path: Path) -> None:
    d = _adapter_dir(tmp_path, **{"b.safetensors": b"b", "adapter_config.json": b"{}", "a.safetensors": b"a"})
    header, chunks = _split(list(upload_requests(d, name="m")))
    expected = ["adapter_config.json", "a.safetensors", "b.safetensors"]
    assert [f.filename for f in header.files] == expected
    assert [c.filename for c in chunks] == expected


def test_header_fields_and_metadata_struct(adapter_dir: Path) -> None:
    metadata = {"accuracy": 0.91, "steps": 300, "eval": {"set": "sst2", "splits": ["dev", None]}, "ok": True}
    header = next(
        upload_requests(
            adapter_dir,
            name="sent",
            description="sentiment",
            tags=["nlp", "cls"],
            metadata=metadata,
            alias="prod",
        )
    ).header
    assert header.description == "sentiment" and header.alias == "prod"
    assert list(header.tags) == ["nlp", "cls"]
    assert header.HasField("metadata")
    assert json_format.MessageToDict(header.metadata) == metadata
    assert header.metadata.fields["steps"].number_value == 300.0  # Struct numbers are doubles


def test_no_metadata_leaves_the_struct_unset_and_a_lone_tag_is_one_tag(adapter_dir: Path) -> None:
    header = next(upload_requests(adapter_dir, name="sent", tags="nlp")).header
    assert not header.HasField("metadata")
    assert list(header.tags) == ["nlp"]


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"adapter_model.safetensors": b"w"}, "no adapter_config.json"),
        ({"adapter_config.json": b"{}"}, r"no \.safetensors"),
        ({"adapter_config.json": b"{}", "README.md": b"x"}, r"no \.safetensors"),
        (
            {"adapter_config.json": b"{}", "adapter_model.bin": b"p", "extra.pt": b"p"},
            r"pickle weights only \(adapter_model.bin, extra.pt\).*safe_serialization=True",
        ),
    ],
)
def test_refused_directories_raise_at_the_call(tmp_path: Path, files: dict[str, bytes], match: str) -> None:
    d = _adapter_dir(tmp_path / "m", **files)
    with pytest.raises(ValueError, match=match):
        upload_requests(d, name="m")  # not iterated: the refusal comes before any streaming


def test_missing_directory_and_plain_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such directory"):
        upload_requests(tmp_path / "nope", name="m")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        upload_requests(tmp_path / "f", name="m")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": ""},
        {"name": "m", "chunk_size": 0},
        {"name": "m", "metadata": {"x": object()}},
        {"name": "m", "metadata": {1: "x"}},
        {"name": "m", "metadata": ["not", "a", "dict"]},
    ],
)
def test_bad_arguments_raise_value_error(adapter_dir: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        upload_requests(adapter_dir, **kwargs)


class _NoCallStub:
    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"{name} was called")


def test_client_refuses_before_any_call(tmp_path: Path) -> None:
    d = _adapter_dir(tmp_path, **{"adapter_config.json": b"{}", "pytorch_model.bin": b"p"})
    with Client("127.0.0.1:1") as client:
        client._adapters = _NoCallStub()  # type: ignore[assignment]
        with pytest.raises(ValueError, match="pickle"):
            client.register_adapter(d, name="m")
        with pytest.raises(ValueError, match="unknown adapter kind"):
            client.list_adapters(kind="ADAPTER")
        with pytest.raises(ValueError, match="unknown adapter kind"):
            client.iter_adapters(kind="bogus")


def test_kind_values() -> None:
    assert kind_value("") == apb.ADAPTER_KIND_UNSPECIFIED
    assert kind_value("lora") == apb.LORA and kind_value("PREFIX") == apb.PREFIX
    assert kind_value(apb.PROMPT) == apb.PROMPT
    with pytest.raises(ValueError):
        kind_value(99)
    with pytest.raises(ValueError):
        kind_value("ADAPTER_KIND_UNSPECIFIED")


def test_list_request() -> None:
    request = list_request(kind="prompt", tag="t", name_prefix="se", all_versions=True, page_size=5)
    assert request == apb.ListAdaptersRequest(
        kind=apb.PROMPT, tag="t", name_prefix="se", all_versions=True, page_size=5
    )
    with pytest.raises(ValueError):
        list_request(page_size=-1)


def test_adapter_dict() -> None:
    info = apb.AdapterInfo(name="sent", version=2, kind=apb.LORA, size_bytes=1 << 40, ref="sent@2")
    info.metadata.update({"acc": 0.9})
    out = adapter_dict(info)
    assert out["kind"] == "LORA" and out["residency"] == "RESIDENCY_UNSPECIFIED"
    assert out["size_bytes"] == 1 << 40  # a number, not the JSON mapping's string
    assert out["metadata"] == {"acc": 0.9} and out["pinned"] is False and out["aliases"] == []
    json.dumps(out)
