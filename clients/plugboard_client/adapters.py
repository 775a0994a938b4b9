"""Adapter-registry helpers shared by the sync and async clients: uploads, list requests, printable dicts.

`upload_requests` checks the directory and hashes its files when called, so every refusal is a
ValueError at the call site, before any RPC starts; only the chunks are read lazily, as gRPC sends them.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from google.protobuf import json_format, struct_pb2

from plugboard.v1 import adapters_pb2 as apb

CONFIG_FILE = "adapter_config.json"
WEIGHTS_SUFFIX = ".safetensors"
# Weights PyTorch saves with pickle; the server never accepts them (unpickling runs arbitrary code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
DEFAULT_CHUNK_SIZE = 1 << 20  # well under gRPC's default 4 MiB message limit

KINDS = ("PREFIX", "PROMPT", "LORA")


def kind_value(kind: str | int) -> int:
    """An AdapterKind from "", "PREFIX", "prompt", "LORA" or the enum value itself ("" / 0 = any kind)."""
    if isinstance(kind, int):
        if kind not in apb.AdapterKind.values():
            raise ValueError(f"unknown adapter kind {kind}")
        return kind
    if not kind:
        return apb.ADAPTER_KIND_UNSPECIFIED
    if kind.upper() not in KINDS:
        raise ValueError(f"unknown adapter kind {kind!r}: expected one of {', '.join(KINDS)}")
    return apb.AdapterKind.Value(kind.upper())


def list_request(
    *,
    kind: str | int = "",
    tag: str = "",
    name_prefix: str = "",
    all_versions: bool = False,
    page_size: int = 0,
    page_token: str = "",
) -> apb.ListAdaptersRequest:
    if page_size < 0:
        raise ValueError(f"page_size must be >= 0 (0 = the server's default), got {page_size}")
    return apb.ListAdaptersRequest(
        kind=kind_value(kind),
        tag=tag,
        name_prefix=name_prefix,
        all_versions=all_versions,
        page_size=page_size,
        page_token=page_token,
    )


def next_page(request: apb.ListAdaptersRequest, page_token: str) -> apb.ListAdaptersRequest:
    """The same query for the page at `page_token` (a copy: the sent request stays as it was)."""
    out = apb.ListAdaptersRequest()
    out.CopyFrom(request)
    out.page_token = page_token
    return out


def adapter_dict(info: apb.AdapterInfo) -> dict[str, Any]:
    """AdapterInfo as a JSON-ready dict: proto field names, unset fields shown, enums by name.

    size_bytes stays a number (the protobuf JSON mapping would make this uint64 a string).
    """
    out = json_format.MessageToDict(
        info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    out["size_bytes"] = info.size_bytes
    return out


def upload_requests(
    directory: str | Path,
    *,
    name: str,
    description: str = "",
    tags: str | Iterable[str] = (),
    metadata: Mapping[str, Any] | None = None,
    alias: str = "",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[apb.RegisterAdapterRequest]:
    """The RegisterAdapter stream for a PEFT `save_pretrained()` directory.

    First a header naming every file with its size and sha256, then each file's chunks in order, with
    offsets. Sends `adapter_config.json` and the top-level `*.safetensors` files, nothing else.
    Raises ValueError now (not while streaming) for a missing directory, a missing config, no
    safetensors weights, or bad arguments; OSError if a file cannot be read.
    """
    if not name:
        raise ValueError("an adapter needs a name")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    files = adapter_files(Path(directory))
    header = apb.RegisterAdapterHeader(
        name=name,
        description=description,
        tags=_tags(tags),
        alias=alias,
        files=[apb.FileManifest(filename=p.name, size_bytes=size, sha256=sha) for p, size, sha in files],
    )
    if metadata is not None:
        header.metadata.CopyFrom(metadata_struct(metadata))
    return _stream(header, [f for f, _, _ in files], chunk_size)


def adapter_files(directory: Path) -> list[tuple[Path, int, str]]:
    """(path, size, sha256 hex) of the files to upload: the config first, then the weights by name."""
    if not directory.exists():
        raise ValueError(f"{directory}: no such directory")
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    # Hidden files are skipped: e.g. macOS "._adapter_model.safetensors" resource forks.
    present = {p.name: p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")}
    if CONFIG_FILE not in present:
        raise ValueError(f"{directory} has no {CONFIG_FILE} (expected a PEFT save_pretrained() directory)")
    weights = sorted(n for n in present if n.endswith(WEIGHTS_SUFFIX))
    if not weights:
        pickles = sorted(n for n in present if n.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise ValueError(
                f"{directory} holds pickle weights only ({', '.join(pickles)}); the server refuses pickle "
                "files: re-save with save_pretrained(..., safe_serialization=True)"
            )
        raise ValueError(f"{directory} has no {WEIGHTS_SUFFIX} weights")
    return [(present[n], *_size_and_sha256(present[n])) for n in [CONFIG_FILE, *weights]]


def metadata_struct(metadata: Mapping[str, Any]) -> struct_pb2.Struct:
    """A google.protobuf.Struct from JSON-like data (numbers become doubles, as in any Struct)."""
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a mapping, not {type(metadata).__name__}")
    bad = [k for k in metadata if not isinstance(k, str)]
    if bad:
        raise ValueError(f"metadata keys must be strings, got {bad[0]!r}")
    struct = struct_pb2.Struct()
    try:
        struct.update(metadata)
    except (TypeError, ValueError) as err:
        raise ValueError(f"metadata must be JSON-like (str, number, bool, None, list, dict): {err}") from err
    return struct


def _tags(tags: str | Iterable[str]) -> list[str]:
    # A lone string is one tag, not one per character.
    out = [tags] if isinstance(tags, str) else list(tags)
    for t in out:
        if not isinstance(t, str):
            raise TypeError(f"tags must be strings, got {type(t).__name__}")
    return out


def _size_and_sha256(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(DEFAULT_CHUNK_SIZE), b""):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def _stream(
    header: apb.RegisterAdapterHeader, paths: list[Path], chunk_size: int
) -> Iterator[apb.RegisterAdapterRequest]:
    yield apb.RegisterAdapterRequest(header=header)
    for path in paths:
        offset = 0
        with open(path, "rb") as f:
            while True:
                data = f.read(chunk_size)
                # An empty file still sends one empty chunk: the server wants data for every file.
                if not data and offset > 0:
                    break
                yield apb.RegisterAdapterRequest(
                    chunk=apb.FileChunk(filename=path.name, offset=offset, data=data)
                )
                offset += len(data)
                if len(data) < chunk_size:
                    break


_END = object()


class RequestSource:
    """A request iterator (sync and async) that remembers the exception it raised.

    gRPC swallows an exception raised by a request iterator and reports the call as CANCELLED; the
    clients re-raise `error` instead, so a file that fails to read mid-upload says so. The async side
    reads in a worker thread so file I/O does not block the event loop.
    """

    def __init__(self, requests: Iterator[apb.RegisterAdapterRequest]) -> None:
        self._requests = requests
        self.error: BaseException | None = None

    def __iter__(self) -> RequestSource:
        return self

    def __next__(self) -> apb.RegisterAdapterRequest:
        try:
            return next(self._requests)
        except StopIteration:
            raise
        except Exception as err:
            self.error = err
            raise

    def __aiter__(self) -> RequestSource:
        return self

    async def __anext__(self) -> apb.RegisterAdapterRequest:
        try:
            item = await asyncio.to_thread(next, self._requests, _END)
        except Exception as err:
            self.error = err
            raise
        if item is _END:
            raise StopAsyncIteration
        return item  # type: ignore[return-value]
