"""The asyncio plugboard client: `Client`'s methods as coroutines, over a grpc.aio channel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Iterable, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from plugboard.v1 import generation_pb2 as pb
from plugboard.v1 import generation_pb2_grpc
from plugboard_client import requests
from plugboard_client.client import DEFAULT_TARGET, ChannelOptions, Metadata
from plugboard_client.errors import DeadlineExceeded, PlugboardError, from_rpc_error
from plugboard_client.requests import Messages


class AsyncClient:
    """An asyncio client for one plugboard server; create it inside the event loop that uses it.

    Arguments and errors as for `Client`. Use `async with AsyncClient(...) as client:` or
    `await client.close()`.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        options: ChannelOptions | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.metadata: tuple[tuple[str, str], ...] = tuple(metadata or ())
        opts = list(options or ())
        self.channel: grpc.aio.Channel = (
            grpc.aio.secure_channel(target, credentials, options=opts)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options=opts)
        )
        self._generation = generation_pb2_grpc.GenerationStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

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

    async def _unary(self, method: Any, request: Any, timeout: float | None, **kwargs: Any) -> Any:
        try:
            return await method(request, timeout=self._timeout(timeout), metadata=self.metadata, **kwargs)
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
        return await self._unary(self._generation.Generate, request, timeout)

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
        call = self._generation.GenerateStream(request, timeout=timeout, metadata=self.metadata)
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
        return await self._unary(self._generation.Score, request, timeout)

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
