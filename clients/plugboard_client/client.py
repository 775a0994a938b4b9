"""The blocking plugboard client: one gRPC channel, typed methods, typed errors."""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from plugboard.v1 import adapters_pb2 as apb
from plugboard.v1 import adapters_pb2_grpc, generation_pb2_grpc
from plugboard.v1 import generation_pb2 as pb
from plugboard_client import adapters, requests
from plugboard_client.errors import DeadlineExceeded, PlugboardError, from_rpc_error
from plugboard_client.requests import Messages
from plugboard_client.routing import with_routing
from plugboard_client.tls import PathLike, channel_security

DEFAULT_TARGET = "127.0.0.1:50051"
Metadata = Sequence[tuple[str, str]]
ChannelOptions = Sequence[tuple[str, Any]]


def call_metadata(metadata: Metadata | None, token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata sent with every call: `metadata`, plus the bearer token (admin or inference) if any."""
    out = tuple(metadata or ())
    if token is None:
        return out
    # Checked here, not by gRPC at call time: a token read from a file with its newline, or pasted
    # with a space, would otherwise fail every call with a puzzling metadata error or a wrong-token one.
    if not token or token != token.strip() or not all(" " < c <= "~" for c in token):
        raise ValueError("token must be non-empty printable ASCII without whitespace")
    if any(key.lower() == "authorization" for key, _ in out):
        raise ValueError("give the token either as token= or as 'authorization' metadata, not both")
    return (*out, ("authorization", f"Bearer {token}"))


class Client:
    """A blocking client for one plugboard server.

    `timeout` is the default per-call deadline in seconds (None: no deadline); every method's own
    `timeout=` overrides it. `metadata` is sent with every call, and so is `token` (as
    `authorization: Bearer <token>`): the admin token, which the admin RPCs need (register, delete,
    alias, load, unload), or the inference token of a server started with --inference-token-file.
    TLS: `tls_ca` (PEM CA bundle that signed the server's certificate; `tls=True` instead trusts the
    system's roots), plus `tls_cert` and `tls_key` for mutual TLS; `tls_server_name` checks the
    certificate for that name instead of the target's host. Or hand in ready `credentials`.
    Failed calls raise `plugboard_client.PlugboardError` subclasses, never bare `grpc.RpcError`.

    Routing by module: a call that applies a module (generate, generate_stream, score with `adapter=`;
    load_adapter, unload_adapter) also sends `x-plugboard-adapter: <module name>` (`ROUTING_HEADER`,
    the name without "@version" or "@alias"), so a proxy in front of several replicas (see
    deploy/envoy) can send each module's calls to the replicas that hold it warm. Any other gRPC
    client, made from the .proto files, should set the same header to benefit from that routing.
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
        self.channel: grpc.Channel = (
            grpc.secure_channel(target, credentials, options=opts)
            if credentials is not None
            else grpc.insecure_channel(target, options=opts)
        )
        self._generation = generation_pb2_grpc.GenerationStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._adapters = adapters_pb2_grpc.AdaptersStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.target!r})"

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _unary(
        self, method: Any, request: Any, timeout: float | None, *, adapter: str = "", **kwargs: Any
    ) -> Any:
        """One unary call; `adapter`: the module it applies, named in the routing header."""
        metadata = with_routing(self.metadata, adapter)
        try:
            return method(request, timeout=self._timeout(timeout), metadata=metadata, **kwargs)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def generate(
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
        """One whole completion of `prompt` (raw text) or `messages` (through the chat template).

        Unset optional parameters (None) leave the choice to the server's defaults.
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
        return self._unary(self._generation.Generate, request, timeout, adapter=request.adapter)

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
    ) -> Generator[pb.GenerateStreamResponse, None, None]:
        """The completion as text deltas; the last message carries finish_reason and the counts.

        The call starts on the first `next()`. Closing the iterator early (`break` in a `for` loop
        followed by garbage collection, or an explicit `.close()`) cancels the call, which frees the
        server's batch slot.
        """
        # Built here, not in the generator, so argument errors surface at the call site.
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

    def _stream(
        self, request: pb.GenerateRequest, timeout: float | None
    ) -> Generator[pb.GenerateStreamResponse, None, None]:
        metadata = with_routing(self.metadata, request.adapter)
        call = self._generation.GenerateStream(request, timeout=timeout, metadata=metadata)
        try:
            yield from call
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        finally:
            call.cancel()  # a no-op once the stream has ended

    def score(
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
        return self._unary(self._generation.Score, request, timeout, adapter=request.adapter)

    def tokenize(
        self, text: str | None = None, *, messages: Messages | None = None, timeout: float | None = None
    ) -> pb.TokenizeResponse:
        """Token ids and token texts of `text`, or of `messages` after the chat template."""
        request = requests.tokenize_request(text, messages=messages)
        return self._unary(self._generation.Tokenize, request, timeout)

    def model_info(self, *, timeout: float | None = None) -> pb.ModelInfoResponse:
        return self._unary(self._generation.ModelInfo, pb.ModelInfoRequest(), timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The gRPC health status name: "SERVING", "NOT_SERVING", ... ("" = the whole server)."""
        response = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_ready(self, timeout: float = 60.0, *, service: str = "", poll_interval: float = 0.2) -> None:
        """Block until the server reports SERVING (it binds at once, then loads its model).

        Raises DeadlineExceeded after `timeout` seconds; other errors (e.g. UNIMPLEMENTED) at once.
        """
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(f"{self.target} not SERVING after {timeout:g}s (last: {last})")
            try:
                # wait_for_ready: while the port is still closed, wait for the channel instead of
                # failing fast with UNAVAILABLE.
                status = self._unary(
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
            time.sleep(max(0.0, min(poll_interval, deadline - time.monotonic())))

    # The module registry (the Adapters service). Refs are "name", "name@7" or "name@alias".

    def list_adapters(
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
        return self._unary(self._adapters.ListAdapters, request, timeout)

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
    ) -> Iterator[apb.AdapterInfo]:
        """Every matching module, page after page (`timeout` applies to each page's call)."""
        # Built here, not in the generator, so argument errors surface at the call site.
        request = adapters.list_request(
            kind=kind,
            tag=tag,
            name_prefix=name_prefix,
            all_versions=all_versions,
            page_size=page_size,
            page_token=page_token,
        )
        return self._pages(request, timeout)

    def _pages(self, request: apb.ListAdaptersRequest, timeout: float | None) -> Iterator[apb.AdapterInfo]:
        while True:
            response = self._unary(self._adapters.ListAdapters, request, timeout)
            yield from response.adapters
            if not response.next_page_token:
                return
            request = adapters.next_page(request, response.next_page_token)

    def get_adapter(self, ref: str, *, timeout: float | None = None) -> apb.AdapterInfo:
        return self._unary(self._adapters.GetAdapter, apb.GetAdapterRequest(adapter=ref), timeout)

    def register_adapter(
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

        Sends adapter_config.json and the *.safetensors files only. Raises ValueError before any call for
        a directory the server would refuse (see `adapters.upload_requests`), OSError if a file cannot
        be read. `timeout` covers the whole upload.
        """
        source = adapters.RequestSource(
            adapters.upload_requests(
                directory,
                name=name,
                description=description,
                tags=tags,
                metadata=metadata,
                alias=alias,
                chunk_size=chunk_size,
            )
        )
        try:
            return self._adapters.RegisterAdapter(
                source, timeout=self._timeout(timeout), metadata=self.metadata
            )
        except grpc.RpcError as err:
            if source.error is not None:  # gRPC only says CANCELLED; the local error says why
                raise source.error from err
            raise from_rpc_error(err) from err

    def delete_adapter(
        self, ref: str, *, force: bool = False, timeout: float | None = None
    ) -> apb.DeleteAdapterResponse:
        """Delete one version ("name@7") or every version ("name"); `force` even if an alias points at it."""
        request = apb.DeleteAdapterRequest(adapter=ref, force=force)
        return self._unary(self._adapters.DeleteAdapter, request, timeout)

    def set_alias(
        self, name: str, alias: str, version: int, *, timeout: float | None = None
    ) -> apb.AdapterInfo:
        """Point `name@alias` at `version`; returns that version's info."""
        request = apb.SetAliasRequest(name=name, alias=alias, version=version)
        return self._unary(self._adapters.SetAlias, request, timeout)

    def load_adapter(self, ref: str, *, timeout: float | None = None) -> apb.AdapterInfo:
        """Load into a device slot and pin it there."""
        # Routed like the module's generation calls: the pin lands on the replica they will reach.
        request = apb.LoadAdapterRequest(adapter=ref)
        return self._unary(self._adapters.LoadAdapter, request, timeout, adapter=ref)

    def unload_adapter(self, ref: str, *, timeout: float | None = None) -> apb.AdapterInfo:
        """Unpin and evict from the device."""
        request = apb.UnloadAdapterRequest(adapter=ref)
        return self._unary(self._adapters.UnloadAdapter, request, timeout, adapter=ref)
