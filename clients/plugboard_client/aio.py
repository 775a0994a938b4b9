"""The asyncio plugboard client: `Client`'s methods as coroutines, over a grpc.aio channel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from plugboard.v1 import adapters_pb2 as apb
from plugboard.v1 import adapters_pb2_grpc, generation_pb2_grpc
from plugboard.v1 import generation_pb2 as pb
from plugboard_client import adapters, requests
from plugboard_client.client import DEFAULT_TARGET, ChannelOptions, Metadata, call_metadata
from plugboard_client.errors import DeadlineExceeded, PlugboardError, from_rpc_error
from plugboard_client.requests import Messages
from plugboard_client.routing import with_routing
from plugboard_client.tls import PathLike, channel_security


class AsyncClient:
    """An asyncio client for one plugboard server; create it inside the event loop that uses it.

    Arguments, errors and the routing header (`x-plugboard-adapter` on calls that apply a module) as for
    `Client`. Use `async with AsyncClient(...) as client:` or `await client.close()`.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        options: ChannelOptions | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        tls: bool = False,
        tls_ca: PathLike | None = None,
        tls_cert: PathLike | None = None,
        tls_key: PathLike | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.metadata: tuple[tuple[str, str], ...] = call_metadata(metadata, token)
        credentials, opts = channel_security(
            credentials,
            options,
            tls=tls,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_server_name=tls_server_name,
        )
        self.channel: grpc.aio.Channel = (
            grpc.aio.secure_channel(target, credentials, options=opts)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options=opts)
        )
        self._generation = generation_pb2_grpc.GenerationStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._adapters = adapters_pb2_grpc.AdaptersStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient({self.target!r})"

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    async def _unary(
        self, method: Any, request: Any, timeout: float | None, *, adapter: str = "", **kwargs: Any
    ) -> Any:
        """One unary call; `adapter`: the module it applies, named in the routing header."""
        metadata = with_routing(self.metadata, adapter)
        try:
            return await method(request, timeout=self._timeout(timeout), metadata=metadata, **kwargs)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        adapter: str = "",
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int = 0,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Iterable[str] = (),
        logprobs: bool = False,
        ignore_eos: bool = False,
        request_id: str = "",
        timeout: float | None = None,
    ) -> pb.GenerateResponse:
        """One whole completion of `prompt` (raw text) or `messages` (through the chat template)."""
        request = requests.generate_request(
            prompt,
            messages=messages,
            adapter=adapter,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
            logprobs=logprobs,
            ignore_eos=ignore_eos,
            request_id=request_id,
        )
        return await self._unary(self._generation.Generate, request, timeout, adapter=request.adapter)

    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        adapter: str = "",
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int = 0,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Iterable[str] = (),
        logprobs: bool = False,
        ignore_eos: bool = False,
        request_id: str = "",
        timeout: float | None = None,
    ) -> AsyncGenerator[pb.GenerateStreamResponse, None]:
        """An async iterator of text deltas: `async for part in client.generate_stream(...)`.

        Not a coroutine: argument errors raise here, the call starts on the first iteration. Closing the
        iterator early (`await it.aclose()`, or `contextlib.aclosing`) cancels the call at once; a
        plain `break` cancels it when the event loop finalises the generator.
        """
        request = requests.generate_request(
            prompt,
            messages=messages,
            adapter=adapter,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
            logprobs=logprobs,
            ignore_eos=ignore_eos,
            request_id=request_id,
        )
        return self._stream(request, self._timeout(timeout))

    async def _stream(
        self, request: pb.GenerateRequest, timeout: float | None
    ) -> AsyncGenerator[pb.GenerateStreamResponse, None]:
        metadata = with_routing(self.metadata, request.adapter)
        call = self._generation.GenerateStream(request, timeout=timeout, metadata=metadata)
        try:
            async for response in call:
                yield response
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        finally:
            call.cancel()  # a no-op once the stream has ended

    async def score(
        self,
        prompt: str | None = None,
        *,
        choices: Sequence[str],
        adapter: str = "",
        messages: Messages | None = None,
        request_id: str = "",
        timeout: float | None = None,
    ) -> pb.ScoreResponse:
        """The log-likelihood and normalised probability of each choice as the continuation."""
        request = requests.score_request(
            prompt, choices=choices, adapter=adapter, messages=messages, request_id=request_id
        )
        return await self._unary(self._generation.Score, request, timeout, adapter=request.adapter)

    async def tokenize(
        self, text: str | None = None, *, messages: Messages | None = None, timeout: float | None = None
    ) -> pb.TokenizeResponse:
        """Token ids and token texts of `text`, or of `messages` after the chat template."""
        request = requests.tokenize_request(text, messages=messages)
        return await self._unary(self._generation.Tokenize, request, timeout)

    async def model_info(self, *, timeout: float | None = None) -> pb.ModelInfoResponse:
        return await self._unary(self._generation.ModelInfo, pb.ModelInfoRequest(), timeout)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The gRPC health status name: "SERVING", "NOT_SERVING", ... ("" = the whole server)."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = await self._unary(self._health.Check, request, timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def wait_ready(
        self, timeout: float = 60.0, *, service: str = "", poll_interval: float = 0.2
    ) -> None:
        """Wait until the server reports SERVING; DeadlineExceeded after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(f"{self.target} not SERVING after {timeout:g}s (last: {last})")
            try:
                # wait_for_ready: while the port is still closed, wait for the channel instead of
                # failing fast with UNAVAILABLE.
                status = await self._unary(
                    self._health.Check,
                    health_pb2.HealthCheckRequest(service=service),
                    remaining,
                    wait_for_ready=True,
                )
            except PlugboardError as err:
                if err.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                last = str(err)
            else:
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(max(0.0, min(poll_interval, deadline - time.monotonic())))

    # The module registry (the Adapters service). Refs are "name", "name@7" or "name@alias".

    async def list_adapters(
        self,
        *,
        kind: str | int = "",
        tag: str = "",
        name_prefix: str = "",
        all_versions: bool = False,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> apb.ListAdaptersResponse:
        """One page of modules (the latest version of each unless `all_versions`); kind "" = any."""
        request = adapters.list_request(
            kind=kind,
            tag=tag,
            name_prefix=name_prefix,
            all_versions=all_versions,
            page_size=page_size,
            page_token=page_token,
        )
        return await self._unary(self._adapters.ListAdapters, request, timeout)

    def iter_adapters(
        self,
        *,
        kind: str | int = "",
        tag: str = "",
        name_prefix: str = "",
        all_versions: bool = False,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> AsyncIterator[apb.AdapterInfo]:
        """Every matching module, page after page: `async for info in client.iter_adapters(...)`.

        Not a coroutine: argument errors raise here; `timeout` applies to each page's call.
        """
        request = adapters.list_request(
            kind=kind,
            tag=tag,
            name_prefix=name_prefix,
            all_versions=all_versions,
            page_size=page_size,
            page_token=page_token,
        )
        return self._pages(request, timeout)

    async def _pages(
        self, request: apb.ListAdaptersRequest, timeout: float | None
    ) -> AsyncGenerator[apb.AdapterInfo, None]:
        while True:
            response = await self._unary(self._adapters.ListAdapters, request, timeout)
            for info in response.adapters:
                yield info
            if not response.next_page_token:
                return
            request = adapters.next_page(request, response.next_page_token)

    async def get_adapter(self, ref: str, *, timeout: float | None = None) -> apb.AdapterInfo:
        return await self._unary(self._adapters.GetAdapter, apb.GetAdapterRequest(adapter=ref), timeout)

    async def register_adapter(
        self,
        directory: str | Path,
        *,
        name: str,
        description: str = "",
        tags: str | Iterable[str] = (),
        metadata: Mapping[str, Any] | None = None,
        alias: str = "",
        chunk_size: int = adapters.DEFAULT_CHUNK_SIZE,
        timeout: float | None = None,
    ) -> apb.AdapterInfo:
        """Upload a PEFT `save_pretrained()` directory as the next version of `name`; admin token needed.

        As `Client.register_adapter`; files are hashed and read in worker threads, off the event loop.
        """
        requests_ = await asyncio.to_thread(
            adapters.upload_requests,
            directory,
            name=name,
            description=description,
            tags=tags,
            metadata=metadata,
            alias=alias,
            chunk_size=chunk_size,
        )
        source = adapters.RequestSource(requests_)
        try:
            return await self._adapters.RegisterAdapter(
                source, timeout=self._timeout(timeout), metadata=self.metadata
            )
        except (grpc.RpcError, asyncio.CancelledError) as err:
            # grpc.aio cancels the call when the request iterator raises, and the await then raises
            # CancelledError; the local error says why. A CancelledError of our own task propagates.
            if source.error is not None:
                raise source.error from err
            if isinstance(err, asyncio.CancelledError):
                raise
            raise from_rpc_error(err) from err

    async def delete_adapter(
        self, ref: str, *, force: bool = False, timeout: float | None = None
    ) -> apb.DeleteAdapterResponse:
        """Delete one version ("name@7") or every version ("name"); `force` even if an alias points at it."""
        request = apb.DeleteAdapterRequest(adapter=ref, force=force)
        return await self._unary(self._adapters.DeleteAdapter, request, timeout)

    async def set_alias(
        self, name: str, alias: str, version: int, *, timeout: float | None = None
    ) -> apb.AdapterInfo:
        """Point `name@alias` at `version`; returns that version's info."""
        request = apb.SetAliasRequest(name=name, alias=alias, version=version)
        return await self._unary(self._adapters.SetAlias, request, timeout)

    async def load_adapter(self, ref: str, *, timeout: float | None = None) -> apb.AdapterInfo:
        """Load into a device slot and pin it there."""
        # Routed like the module's generation calls: the pin lands on the replica they will reach.
        request = apb.LoadAdapterRequest(adapter=ref)
        return await self._unary(self._adapters.LoadAdapter, request, timeout, adapter=ref)

    async def unload_adapter(self, ref: str, *, timeout: float | None = None) -> apb.AdapterInfo:
        """Unpin and evict from the device."""
        request = apb.UnloadAdapterRequest(adapter=ref)
        return await self._unary(self._adapters.UnloadAdapter, request, timeout, adapter=ref)
