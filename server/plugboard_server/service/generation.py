"""The Generation service: Generate, GenerateStream, Score, Tokenize, ModelInfo."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc

from plugboard.v1 import generation_pb2 as pb
from plugboard.v1 import generation_pb2_grpc
from plugboard_server import __version__
from plugboard_server.engine.engine import Engine
from plugboard_server.engine.types import Finished
from plugboard_server.errors import IncompatibleAdapter
from plugboard_server.metrics import Metrics
from plugboard_server.registry.store import AdapterRef, RegistryStore
from plugboard_server.service import convert
from plugboard_server.service.errors import rpc


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, engine: Callable[[], Engine], store: RegistryStore, metrics: Metrics) -> None:
        # `engine` raises NotReady until the model is loaded: the server answers health checks
        # (NOT_SERVING) and refuses calls with UNAVAILABLE while it loads.
        self._engine = engine
        self._store = store
        self.metrics = metrics

    async def _resolve(self, engine: Engine, adapter: str) -> AdapterRef | None:
        """ "" -> the base model; "name", "name@7", "name@alias" -> the version it names.

        A version published for another base model (replicas may share a registry) is refused.
        """
        if not adapter:
            return None
        # Off the event loop: an object-store registry may go to the network to look it up.
        version = await asyncio.to_thread(self._store.get, adapter)
        fingerprint = engine.loaded.fingerprint
        if version.facts.base_model and version.facts.base_model != fingerprint:
            raise IncompatibleAdapter(
                f"module {version.key} was made for base model {version.facts.base_model}; "
                f"this server serves {fingerprint}"
            )
        return version.ref

    @rpc("Generate")
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        engine = self._engine()
        result = await engine.generate(
            convert.generate_input(request, await self._resolve(engine, request.adapter))
        )
        return convert.generate_response(result)

    @rpc("GenerateStream")
    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        engine = self._engine()
        stream = await engine.submit(
            convert.generate_input(request, await self._resolve(engine, request.adapter))
        )
        try:
            async for event in stream:
                if isinstance(event, Finished):
                    yield convert.stream_end(
                        event, adapter=stream.adapter, request_id=stream.request_id, seed=stream.seed
                    )
                else:
                    yield convert.stream_delta(event)
        finally:
            stream.cancel()  # a no-op once finished; frees the row when the client went away

    @rpc("Score")
    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        engine = self._engine()
        return convert.score_response(
            await engine.score(convert.score_input(request, await self._resolve(engine, request.adapter)))
        )

    @rpc("Tokenize")
    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        result = await self._engine().tokenize(request.text, convert.messages(request.messages))
        return convert.tokenize_response(result)

    @rpc("ModelInfo")
    async def ModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfoResponse:
        return convert.model_info(self._engine().info(), __version__)
