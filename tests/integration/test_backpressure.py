"""Backpressure and cancellation under load: bounded queues answer RESOURCE_EXHAUSTED with a retry hint
and recover; an expired or cancelled request gives back its row and its module's slot."""

from __future__ import annotations

import threading
import time

import pytest

from plugboard.v1 import adapters_pb2 as apb
from plugboard_client import Client, DeadlineExceeded, ResourceExhausted
from tests.support import peft_modules as pm
from tests.support.server import ServerThread, server_config


def _wait(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


def test_the_queued_token_budget_refuses_with_a_retry_hint_then_recovers(tiny_model):
    srv = ServerThread(
        server_config(max_batch_size=1, max_queued_tokens=64), loader=lambda: tiny_model
    ).start()
    try:
        with Client(srv.target, timeout=60) as c:
            running = c.generate_stream("a", max_new_tokens=400, ignore_eos=True)
            next(running)  # holds the only row
            queued = threading.Thread(target=lambda: c.generate("b", max_new_tokens=40))
            queued.start()
            _wait(lambda: srv.server.engine.waiting == 1)
            with pytest.raises(ResourceExhausted, match="queued tokens") as err:
                c.generate("c", max_new_tokens=40)  # 40 + 40 + prompts > 64
            assert 0.05 <= err.value.retry_after <= 30
            running.close()
            queued.join(60)
            assert c.generate("c", max_new_tokens=40).generated_tokens > 0  # recovered
    finally:
        srv.stop()


def test_concurrent_rpcs_beyond_the_limit_are_refused_then_recover(tiny_model):
    srv = ServerThread(server_config(max_concurrent_rpcs=2), loader=lambda: tiny_model).start()
    try:
        with Client(srv.target, timeout=60) as c:
            streams = [c.generate_stream("x", max_new_tokens=400, ignore_eos=True) for _ in range(2)]
            for s in streams:
                next(s)
            with pytest.raises(ResourceExhausted):
                c.generate("y", max_new_tokens=2)
            for s in streams:
                s.close()
            _wait(lambda: srv.server.engine.running == 0)
            _wait(lambda: _succeeds(c))
    finally:
        srv.stop()


def _succeeds(c: Client) -> bool:
    try:
        return c.generate("z", max_new_tokens=2).generated_tokens == 2
    except ResourceExhausted:  # the cancelled calls may take a moment to leave the server's count
        return False


@pytest.fixture
def two_modules(tiny_model_dir, tmp_path):
    root = tmp_path / "modules"
    pm.lora(tiny_model_dir, root / "slow-lora", r=4, seed=1)
    pm.prefix(tiny_model_dir, root / "next-prefix", tokens=4, seed=2)
    return root


def test_an_expired_request_frees_its_module_slot_and_the_module_can_be_evicted(tiny_model, two_modules):
    # One device slot: while the expired request held it, no other module could be served.
    srv = ServerThread(
        server_config(max_loaded_adapters=1, adapters_dir=two_modules), loader=lambda: tiny_model
    ).start()
    try:
        with Client(srv.target, timeout=60) as c:
            load = [c.generate_stream("load", max_new_tokens=400, ignore_eos=True) for _ in range(3)]
            for s in load:
                next(s)
            with pytest.raises(DeadlineExceeded):
                c.generate("held", adapter="slow-lora", max_new_tokens=400, ignore_eos=True, timeout=0.5)
            _wait(lambda: srv.server.engine.running == 3)  # the expired row left, the load goes on
            answer = c.generate("next", adapter="next-prefix", max_new_tokens=3, timeout=30)
            assert answer.adapter == "next-prefix@1"  # it got the only slot
            c.unload_adapter("slow-lora")
            assert c.get_adapter("slow-lora").residency == apb.Residency.DISK
            for s in load:
                s.close()
    finally:
        srv.stop()


def test_a_module_that_can_never_get_a_slot_is_refused_not_left_waiting(tiny_model, two_modules):
    srv = ServerThread(
        server_config(max_loaded_adapters=1, adapters_dir=two_modules), loader=lambda: tiny_model
    ).start()
    try:
        with Client(srv.target, timeout=60) as c:
            c.load_adapter("slow-lora")  # pins the only slot
            with pytest.raises(ResourceExhausted, match="pinned"):
                c.generate("x", adapter="next-prefix", max_new_tokens=2)
            assert c.generate("x", adapter="slow-lora", max_new_tokens=2).generated_tokens == 2
            c.unload_adapter("slow-lora")
            assert c.generate("x", adapter="next-prefix", max_new_tokens=2).generated_tokens == 2
    finally:
        srv.stop()
