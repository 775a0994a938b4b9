"""A real Prometheus scrapes a real plugboard-server: the series arrive, the dashboard and the alerts work.

Debian's `prometheus` binary on 127.0.0.1 (free ports, a temporary TSDB, 1 s scrapes) scrapes a
`plugboard-server` process serving the tiny model; the test sends requests, then asks Prometheus's
HTTP API what it saw. Without the binary it skips, except under CI, which installs it (.ci/run).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from plugboard_client import Client
from tests.support.tools import free_port, missing_tool

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
ALERTS_YML = REPO / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD_JSON = REPO / "deploy" / "grafana" / "dashboards" / "plugboard.json"
REQUESTS = 3
TIMEOUT_S = 60.0


def _prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path:
        return path
    reason = "prometheus is not installed: apt-get install prometheus (Debian's package; .ci/run installs it)"
    missing_tool(reason)


def _wait_for(what: str, probe: Callable[[], Any], timeout: float = TIMEOUT_S) -> Any:
    """Poll `probe` until it answers something truthy; after `timeout`, fail naming `what` and the answer."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; last answer: {last!r}")


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """SIGTERM (both servers shut down cleanly on it), then SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(10)


@dataclass
class Stack:
    target: str  # plugboard's gRPC address
    metrics_url: str  # plugboard's /metrics
    prometheus_url: str
    generated_tokens: int  # summed over the answers the test received

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector; an error answer fails the test with Prometheus's message."""
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # 400 / 422 for a bad query, with the reason in the body
            body = json.load(exc)
        assert body["status"] == "success", f"{promql}: {body.get('errorType')}: {body.get('error')}"
        return body["data"]["result"]

    def value(self, promql: str) -> float | None:
        """The single value `promql` yields now, or None while it yields nothing."""
        result = self.query(promql)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("prometheus-e2e")
    port, metrics_port, prometheus_port = free_port(), free_port(), free_port()
    prometheus_bin = _prometheus_binary()
    server_log = (tmp / "plugboard.log").open("wb")
    server = subprocess.Popen(
        [
            str(BIN / "plugboard-server"),
            "--model",
            str(tiny_model_dir),
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--registry",
            str(tmp / "registry"),
            "--grace-period",
            "10",
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=server_log,
        stderr=subprocess.STDOUT,
    )
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS_YML)],  # the real alerts, to see Prometheus load and evaluate them
        "scrape_configs": [
            {"job_name": "plugboard", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus_log = (tmp / "prometheus.log").open("wb")
    prometheus = subprocess.Popen(
        [
            prometheus_bin,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
            "--log.level=warn",
        ],
        stdout=prometheus_log,
        stderr=subprocess.STDOUT,
    )
    try:
        target = f"127.0.0.1:{port}"
        with Client(target, timeout=30) as client:
            client.wait_ready(TIMEOUT_S)
            s = Stack(
                target, f"http://127.0.0.1:{metrics_port}/metrics", f"http://127.0.0.1:{prometheus_port}", 0
            )

            def prometheus_ready() -> bool:
                if prometheus.poll() is not None:
                    log = (tmp / "prometheus.log").read_text()
                    pytest.fail(f"prometheus exited with {prometheus.returncode}:\n{log}")
                return _ready(s.prometheus_url)

            _wait_for("Prometheus to start", prometheus_ready)
            # A first scrape before any request: labelled counters appear with their first request, and
            # rate() sees an increase only between two scrapes. Then a request every other scrape.
            _wait_for("the first scrape", lambda: s.value("plugboard_ready") == 1.0)
            for i in range(REQUESTS):
                answer = client.generate(f"request {i}", max_new_tokens=4, ignore_eos=True)
                s.generated_tokens += answer.generated_tokens
                time.sleep(2.0)
        yield s
    finally:
        prometheus_code, server_code = _stop(prometheus), _stop(server)
        server_log.close()
        prometheus_log.close()
    assert server_code == 0, (tmp / "plugboard.log").read_text()
    assert prometheus_code == 0, (tmp / "prometheus.log").read_text()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _server_metric(stack: Stack, sample_name: str) -> float:
    """The sum of a sample's values in the server's own /metrics right now."""
    with urllib.request.urlopen(stack.metrics_url, timeout=10) as response:
        text = response.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample_name
    )


def test_prometheus_scrapes_the_request_count_readiness_and_tokens(stack: Stack):
    ok = 'sum(plugboard_requests_total{job="plugboard", method="Generate", code="OK"})'
    _wait_for(f"{ok} == {REQUESTS}", lambda: stack.value(ok) == REQUESTS)
    assert stack.value('plugboard_ready{job="plugboard"}') == 1.0
    # the server's warm-up generation counts too: Prometheus must agree with the server's own figure
    tokens = "sum(plugboard_generated_tokens_total)"
    expected = _server_metric(stack, "plugboard_generated_tokens_total")
    assert expected >= stack.generated_tokens
    _wait_for(f"{tokens} == {expected}", lambda: stack.value(tokens) == expected)
    (info,) = stack.query("plugboard_model_info")
    assert info["metric"]["model"] == "tiny-llama-s0" and info["metric"]["device"] == "cpu"


def _dashboard_queries() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD_JSON.read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]


def _as_promql(expr: str) -> str:
    """Grafana's variables as Grafana would fill them in: every instance, a 1 m window, a 5 m range."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__range", "5m")
    return re.sub(r"\$\w+", ".*", expr)


def test_every_dashboard_query_runs_and_the_main_panels_show_the_traffic(stack: Stack):
    ok = 'sum(plugboard_requests_total{method="Generate", code="OK"})'
    _wait_for("the requests to be scraped", lambda: stack.value(ok) == REQUESTS)
    time.sleep(1.5)  # one more scrape after the last change, so that rate() sees it
    results = {}
    for title, expr in _dashboard_queries():
        results[title, expr] = stack.query(_as_promql(expr))  # fails on any query Prometheus refuses

    def figures(title: str, needle: str) -> list[float]:
        (result,) = [r for (t, expr), r in results.items() if t == title and needle in expr]
        return [float(sample["value"][1]) for sample in result]

    for title, needle in (
        ("Requests / s", "plugboard_requests_total"),
        ("Generated tokens / s", "plugboard_generated_tokens_total"),
        ("Generation latency (p50 / p90 / p99)", "0.99"),
        ("Time to first token (p50 / p90 / p99)", "0.5"),
        ("Batch size (rows per decode step)", "_sum"),
        ("Top 10 modules by requests (time range)", "topk"),
    ):
        values = figures(title, needle)
        assert values and all(math.isfinite(v) and v > 0 for v in values), (title, values)
    assert figures("Ready", "plugboard_ready") == [1.0]
    assert figures("Running / waiting", "plugboard_waiting_requests") == [0.0]


def test_prometheus_loads_the_alert_rules_and_none_fires(stack: Stack):
    def rules() -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{stack.prometheus_url}/api/v1/rules", timeout=10) as response:
            groups = json.load(response)["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    expected = {
        rule["alert"] for group in yaml.safe_load(ALERTS_YML.read_text())["groups"] for rule in group["rules"]
    }
    evaluated = _wait_for(
        "every alert rule to be evaluated",
        lambda: (r := rules()) and all(x["health"] != "unknown" for x in r) and r,
    )
    assert {rule["name"] for rule in evaluated} == expected
    assert all(rule["health"] == "ok" for rule in evaluated), [
        (r["name"], r.get("lastError")) for r in evaluated
    ]
    assert [rule["name"] for rule in evaluated if rule["state"] != "inactive"] == []
