"""AuthInterceptor: which token each RPC needs under each configuration, and what a refusal says."""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

import grpc
import pytest

from plugboard_server.service.auth import AuthInterceptor

ADMIN, INFERENCE = "admin-tok", "inference-tok"
GENERATE = "/plugboard.v1.Generation/Generate"
STREAM = "/plugboard.v1.Generation/GenerateStream"
LIST = "/plugboard.v1.Adapters/ListAdapters"
DELETE = "/plugboard.v1.Adapters/DeleteAdapter"
REGISTER = "/plugboard.v1.Adapters/RegisterAdapter"
HEALTH = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
SHAPES = {STREAM: (False, True), REGISTER: (True, False), REFLECTION: (True, True)}


class Details(NamedTuple):
    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


class Aborted(Exception):
    pass


class Context:
    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


def outcome(interceptor: AuthInterceptor, method: str, token: str | None) -> Any:
    """ "ok" when the call reaches the servicer, else (status code name, details)."""
    request_streaming, response_streaming = SHAPES.get(method, (False, False))
    servicer = grpc.unary_unary_rpc_method_handler(lambda r, c: None)
    servicer = servicer._replace(request_streaming=request_streaming, response_streaming=response_streaming)

    async def continuation(details: Any) -> Any:
        return servicer

    async def run() -> Any:
        metadata = () if token is None else (("authorization", f"Bearer {token}"),)
        handler = await interceptor.intercept_service(continuation, Details(method, metadata))
        if handler is servicer:
            return "ok"
        assert (handler.request_streaming, handler.response_streaming) == (
            request_streaming,
            response_streaming,
        )
        behaviour = (
            handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        )
        try:
            await behaviour(None, Context())
        except Aborted as err:
            code, details = err.args
            return code.name, details
        raise AssertionError("the refusal did not abort")

    return asyncio.run(run())


OK, NO, BAD = "ok", "UNAUTHENTICATED", "PERMISSION_DENIED"


@pytest.mark.parametrize(
    ("tokens", "method", "token", "expected"),
    [
        # both tokens: admin RPCs need the admin token, the rest either
        ({"admin_token": ADMIN, "inference_token": INFERENCE}, GENERATE, None, NO),
        ({"admin_token": ADMIN, "inference_token": INFERENCE}, GENERATE, "nope", BAD),
        ({"admin_token": ADMIN, "inference_token": INFERENCE}, GENERATE, INFERENCE, OK),
        ({"admin_token": ADMIN, "inference_token": INFERENCE}, STREAM, ADMIN, OK),
        ({"admin_token": ADMIN, "inference_token": INFERENCE}, LIST, INFERENCE, OK),
        ({"admin_token": ADMIN, "inference_token": INFERENCE}, DELETE, INFERENCE, BAD),
        ({"admin_token": ADMIN, "inference_token": INFERENCE}, REGISTER, INFERENCE, BAD),
        ({"admin_token": ADMIN, "inference_token": INFERENCE}, REGISTER, None, NO),
        ({"admin_token": ADMIN, "inference_token": INFERENCE}, DELETE, ADMIN, OK),
        ({"admin_token": ADMIN, "inference_token": INFERENCE}, HEALTH, None, OK),
        ({"admin_token": ADMIN, "inference_token": INFERENCE}, REFLECTION, "nope", OK),
        # admin token only: as before, everything but the admin RPCs is open
        ({"admin_token": ADMIN}, GENERATE, None, OK),
        ({"admin_token": ADMIN}, LIST, "nope", OK),
        ({"admin_token": ADMIN}, DELETE, None, NO),
        ({"admin_token": ADMIN}, DELETE, "nope", BAD),
        ({"admin_token": ADMIN}, DELETE, ADMIN, OK),
        # inference token only: every plugboard RPC needs it, admin ones included
        ({"inference_token": INFERENCE}, GENERATE, None, NO),
        ({"inference_token": INFERENCE}, GENERATE, INFERENCE, OK),
        ({"inference_token": INFERENCE}, DELETE, None, NO),
        ({"inference_token": INFERENCE}, DELETE, INFERENCE, OK),
        ({"inference_token": INFERENCE}, HEALTH, None, OK),
    ],
)
def test_who_may_call_what(tokens: dict, method: str, token: str | None, expected: str) -> None:
    got = outcome(AuthInterceptor(**tokens), method, token)
    assert (got if got == OK else got[0]) == expected
    if got != OK:
        assert token is None or token not in got[1]  # a refusal never echoes the token


def test_refusals_say_what_is_needed() -> None:
    both = AuthInterceptor(admin_token=ADMIN, inference_token=INFERENCE)
    assert outcome(both, GENERATE, None)[1] == (
        "this call needs the inference token (or the admin token): "
        "send metadata 'authorization: Bearer <token>'"
    )
    assert (
        outcome(both, DELETE, INFERENCE)[1]
        == "this call needs the admin token; the inference token is not enough"
    )
    assert outcome(both, DELETE, "nope")[1] == "the token is wrong: this call needs the admin token"
    assert outcome(AuthInterceptor(inference_token=INFERENCE), DELETE, "x")[1] == (
        "the token is wrong: this call needs the inference token"
    )


def test_unknown_methods_stay_unimplemented() -> None:
    interceptor = AuthInterceptor(inference_token=INFERENCE)

    async def continuation(details: Any) -> None:
        return None

    details = Details("/plugboard.v1.Generation/Nope", ())
    assert asyncio.run(interceptor.intercept_service(continuation, details)) is None
