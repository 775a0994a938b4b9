"""Standard health states, server reflection, and the Prometheus endpoint."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from plugboard.v1 import adapters_pb2, adapters_pb2_grpc
from plugboard_client import Client, InvalidArgument
from tests.support.server import ServerThread, server_config

SERVICES = {"plugboard.v1.Generation", "plugboard.v1.Adapters", "grpc.health.v1.Health"}


def test_health_goes_not_serving_then_serving_then_not_serving_while_draining(tiny_model):
    release = threading.Event()

    def slow_loader():
        release.wait(30)
        return tiny_model

    srv = ServerThread(server_config(), loader=slow_loader).start(wait_ready=False)
    with Client(srv.target, timeout=10) as c:
        assert c.health() == "NOT_SERVING"
        assert c.health("plugboard.v1.Generation") == "NOT_SERVING"
        release.set()
        c.wait_ready(30)
        assert c.health() == c.health("plugboard.v1.Generation") == "SERVING"
        stream = c.generate_stream("drain me", max_new_tokens=300, ignore_eos=True)
        first = next(stream)
        draining = srv.submit(srv.server.shutdown(10))
        deadline = time.monotonic() + 5
        while c.health() != "NOT_SERVING":
            assert time.monotonic() < deadline, "health never turned NOT_SERVING"
            time.sleep(0.01)
        rest = list(stream)
        assert rest[-1].generated_tokens == 300  # the in-flight stream finished during the drain
        assert first.text is not None
        assert draining.result(30) is True
    srv.close()


def test_reflection_lists_the_services(server):
    with grpc.insecure_channel(server.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        assert set(db.get_services()) >= SERVICES
        service = descriptor_pool.DescriptorPool(db).FindServiceByName("plugboard.v1.Generation")
        assert {m.name for m in service.methods} == {
            "Generate",
            "GenerateStream",
            "Score",
            "Tokenize",
            "ModelInfo",
        }


def test_adapters_service_answers_on_an_empty_registry(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = adapters_pb2_grpc.AdaptersStub(channel)
        response = stub.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=10)
        assert list(response.adapters) == [] and response.next_page_token == ""


def _scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_metrics_counters_move(server, client):
    before = _scrape(server.metrics_url)
    client.generate("count me", max_new_tokens=5, ignore_eos=True)
    with pytest.raises(InvalidArgument):  # counted too
        client.generate("", max_new_tokens=5)
    after = _scrape(server.metrics_url)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('plugboard_requests_total{code="OK",method="Generate"}') == 1
    assert delta('plugboard_requests_total{code="INVALID_ARGUMENT",method="Generate"}') == 1, {
        k: v for k, v in after.items() if "requests_total" in k
    }
    assert delta("plugboard_generated_tokens_total") == 5
    assert delta("plugboard_prompt_tokens_total") > 0
    assert delta("plugboard_time_to_first_token_seconds_count") == 1
    assert delta("plugboard_time_per_output_token_seconds_count") == 1
    assert delta('plugboard_request_duration_seconds_count{method="Generate"}') == 2
    assert delta("plugboard_batch_size_count") >= 4
    assert after["plugboard_ready"] == 1
    assert after["plugboard_running_requests"] == 0
    assert any(k.startswith("plugboard_model_info{") for k in after)
    assert after["process_resident_memory_bytes"] > 0
