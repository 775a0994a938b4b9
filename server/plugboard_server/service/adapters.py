"""The Adapters service: list, inspect, register, alias, delete, load and unload module versions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf import json_format

from plugboard.v1 import adapters_pb2 as pb
from plugboard.v1 import adapters_pb2_grpc
from plugboard_server.engine.engine import Engine
from plugboard_server.errors import InvalidRequest, NotReady
from plugboard_server.metrics import Metrics
from plugboard_server.registry.store import ModuleVersion, RegistryStore, check_alias, check_name, parse_ref
from plugboard_server.service.errors import rpc
from plugboard_server.service.upload import UploadAssembler

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100


class AdaptersServicer(adapters_pb2_grpc.AdaptersServicer):
    def __init__(
        self, engine: Callable[[], Engine], store: RegistryStore, metrics: Metrics, *, max_upload_bytes: int
    ) -> None:
        self._engine = engine  # raises NotReady while the model loads
        self._store = store
        self.metrics = metrics
        self._max_upload_bytes = max_upload_bytes

    def _info(self, v: ModuleVersion) -> pb.AdapterInfo:
        try:
            residency, pinned = self._engine().residency(v.key)
        except NotReady:
            residency, pinned = "DISK", False
        info = pb.AdapterInfo(
            name=v.name,
            version=v.version,
            kind=pb.AdapterKind.Value(v.facts.kind),
            aliases=list(v.aliases),
            base_model=v.facts.base_model,
            size_bytes=v.size_bytes,
            residency=pb.Residency.Value(residency),
            pinned=pinned,
            description=v.description,
            tags=list(v.tags),
            peft_type=v.facts.peft_type,
            rank=v.facts.rank,
            num_virtual_tokens=v.facts.num_virtual_tokens,
            target_modules=list(v.facts.target_modules),
            sha256=dict(v.files),
            ref=v.key,
        )
        info.created_at.FromNanoseconds(int(v.created_at * 1e9))
        if v.metadata:
            info.metadata.update(dict(v.metadata))
        return info

    async def _refresh_counts(self) -> None:
        modules, versions = await asyncio.to_thread(self._store.count)
        self.metrics.registry_modules.set(modules)
        self.metrics.registry_versions.set(versions)

    @rpc("ListAdapters")
    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAdaptersResponse:
        if request.page_size > MAX_PAGE_SIZE:
            raise InvalidRequest(f"at most {MAX_PAGE_SIZE} per page", field="page_size")
        if request.kind not in pb.AdapterKind.values():
            raise InvalidRequest(f"unknown kind {request.kind}", field="kind")
        kind = pb.AdapterKind.Name(request.kind) if request.kind else ""
        versions, token = await asyncio.to_thread(
            self._store.list_versions,
            page_size=request.page_size or DEFAULT_PAGE_SIZE,
            page_token=request.page_token,
            kind=kind,
            tag=request.tag,
            name_prefix=request.name_prefix,
            all_versions=request.all_versions,
        )
        return pb.ListAdaptersResponse(adapters=[self._info(v) for v in versions], next_page_token=token)

    @rpc("GetAdapter")
    async def GetAdapter(
        self, request: pb.GetAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.AdapterInfo:
        return self._info(await asyncio.to_thread(self._store.get, request.adapter))

    @rpc("RegisterAdapter")
    async def RegisterAdapter(
        self, requests: AsyncIterator[pb.RegisterAdapterRequest], context: grpc.aio.ServicerContext
    ) -> pb.AdapterInfo:
        engine = self._engine()  # validating needs the model: refuse early while it loads
        first = await anext(aiter(requests), None)
        if first is None or not first.HasField("header"):
            raise InvalidRequest(
                "the first message must be the header (name, description, ...)", field="header"
            )
        header = first.header
        check_name(header.name)
        if header.alias:
            check_alias(header.alias)
        metadata = _metadata(header)
        manifest = [(f.filename, f.size_bytes, f.sha256) for f in header.files]
        with self._store.staging() as staging:
            upload = UploadAssembler(staging, manifest, self._max_upload_bytes)
            async for message in requests:
                if not message.HasField("chunk"):
                    raise InvalidRequest("only one header, then file chunks", field="header")
                chunk = message.chunk
                # Off the event loop: a slow or full disk must not stall every other call.
                await asyncio.to_thread(upload.add, chunk.filename, chunk.offset, chunk.data)
            await asyncio.to_thread(upload.finish)
            facts = await engine.module_facts(staging)
            version = await asyncio.to_thread(
                self._store.publish,
                header.name,
                staging,
                facts,
                description=header.description,
                tags=tuple(header.tags),
                metadata=metadata,
                alias=header.alias or None,
            )
        await self._refresh_counts()
        return self._info(version)

    @rpc("DeleteAdapter")
    async def DeleteAdapter(
        self, request: pb.DeleteAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteAdapterResponse:
        name, _ = parse_ref(request.adapter)
        version = None
        if "@" in request.adapter:
            version = (await asyncio.to_thread(self._store.get, request.adapter)).version
        deleted = await asyncio.to_thread(self._store.delete, name, version, force=request.force)
        try:
            engine = self._engine()
            for key in deleted:  # rows already using it finish on their copy
                engine.unload_module(key)
        except NotReady:
            pass
        await self._refresh_counts()
        return pb.DeleteAdapterResponse(deleted=deleted)

    @rpc("SetAlias")
    async def SetAlias(
        self, request: pb.SetAliasRequest, context: grpc.aio.ServicerContext
    ) -> pb.AdapterInfo:
        version = await asyncio.to_thread(self._store.set_alias, request.name, request.alias, request.version)
        return self._info(version)

    @rpc("LoadAdapter")
    async def LoadAdapter(
        self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.AdapterInfo:
        version = await asyncio.to_thread(self._store.get, request.adapter)
        await self._engine().pin_module(version.ref)
        return self._info(version)

    @rpc("UnloadAdapter")
    async def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.AdapterInfo:
        version = await asyncio.to_thread(self._store.get, request.adapter)
        self._engine().unload_module(version.key)
        return self._info(version)


def _metadata(header: pb.RegisterAdapterHeader) -> dict | None:
    if not header.HasField("metadata"):
        return None
    try:
        return json_format.MessageToDict(header.metadata)
    except ValueError as exc:  # NaN or Infinity: JSON has no such numbers
        raise InvalidRequest(f"not JSON-representable: {exc}", field="metadata") from None
