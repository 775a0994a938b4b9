"""Prometheus config and alerts, and the Grafana dashboard: valid, provisionable, and about real metrics.

promtool (Debian's `prometheus` package) checks the Prometheus files, unit-tests the alerts and parses
every dashboard query; every metric and label the dashboard and the alerts name must be one that
plugboard_server.metrics exports, so a rename fails here. test_containers.py covers compose and the image.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from plugboard_server.metrics import Metrics
from tests.deploy.deploy_files import (
    ALERTS_YML,
    DASHBOARD_JSON,
    DATASOURCE,
    GRAFANA_PROVISIONING,
    PROMETHEUS_YML,
    TARGET_LABELS,
    bind_mounts,
    compose,
    load_yaml,
    promtool,
)


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_JSON.read_text())


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target."""
    return [
        (f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"])
        for p in iter_panels(dashboard()["panels"])
        for t in p.get("targets", [])
    ]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS_YML)["groups"] for rule in group["rules"]]


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables replaced by values Prometheus accepts: intervals by 5m, the rest by `.*`."""
    expr = re.sub(r"\$\{?__(rate_interval|interval|range)\}?", "5m", expr)
    return re.sub(r"\$\{\w+(:\w+)?\}|\$\w+", ".*", expr)


# ----------------------------------------------------------------------------- metric catalogue

_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "info": ("_info",)}


def exported_series() -> dict[str, set[str] | None]:
    """Every series name plugboard exports -> its label names (None: not known, as for an Info's).

    Names come from the registry's families (counter -> _total, histogram -> _bucket/_sum/_count, info
    -> _info); label names from the metric objects, which have no samples before their first use.
    """
    metrics = Metrics()
    declared: dict[str, set[str]] = {}
    for obj in vars(metrics).values():
        for candidate in (obj, *getattr(obj, "__dict__", {}).values()):  # ResidencyGauge wraps its Gauge
            if isinstance(candidate, MetricWrapperBase):
                declared[candidate._name] = set(candidate._labelnames)
    series: dict[str, set[str] | None] = {}
    for family in metrics.registry.collect():
        labels = declared.get(family.name) if family.type != "info" else None
        if labels is None and family.type != "info":
            labels = {k for s in family.samples for k in s.labels}  # process_* and python_info
        for suffix in _SUFFIXES.get(family.type, ("",)):
            extra = {"le"} if suffix == "_bucket" else set()
            series[family.name + suffix] = None if labels is None else labels | extra
    return series


_METRIC = re.compile(r"\b((?:plugboard|process|python)_[a-zA-Z0-9_]*)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def check_expression(expr: str, series: dict[str, set[str] | None], legend: str = "") -> list[str]:
    """What is wrong with `expr`'s metric and label names (an empty list when nothing is)."""
    problems = []
    bare = _STRING.sub('""', expr)
    names = set(_METRIC.findall(bare))
    problems += [f"unknown metric {name}" for name in sorted(names - series.keys())]
    known = {name: series[name] for name in names if name in series}
    for name, matchers in _SELECTOR.findall(bare):
        labels = known.get(name)
        if labels is not None:
            allowed = labels | TARGET_LABELS
            problems += [
                f"{name} has no label {label!r}"
                for label in _MATCHER_LABEL.findall(matchers)
                if label not in allowed
            ]
    if any(labels is None for labels in known.values()):
        return problems  # an Info's labels are the keys of its value, declared nowhere: no more to check
    available = TARGET_LABELS.union(*known.values())
    grouped = {label.strip() for group in _GROUPING.findall(bare) for label in group.split(",")} - {""}
    legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
    problems += [f"no metric here has the label {label!r}" for label in sorted(grouped - available)]
    problems += [f"legend names label {label!r}, absent" for label in sorted(legend_labels - available)]
    return problems


def test_the_metric_catalogue_sees_plugboards_metrics_with_their_labels():
    series = exported_series()
    assert series["plugboard_requests_total"] == {"method", "code"}
    assert series["plugboard_request_duration_seconds_bucket"] == {"method", "le"}
    assert series["plugboard_adapter_resident"] == {"adapter", "tier"}
    assert series["plugboard_model_info"] is None
    assert "plugboard_requests" not in series and "process_resident_memory_bytes" in series
    assert check_expression('rate(plugboard_requests_total{modul="x"}[5m])', series) == [
        "plugboard_requests_total has no label 'modul'"
    ]
    assert check_expression("sum(plugboard_adapter_requests_totl)", series) == [
        "unknown metric plugboard_adapter_requests_totl"
    ]
    assert check_expression("sum by (module) (rate(plugboard_adapter_requests_total[5m]))", series) == [
        "no metric here has the label 'module'"
    ]


def test_the_dashboard_and_the_alerts_name_only_metrics_and_labels_plugboard_exports():
    series = exported_series()
    problems = []
    for panel in iter_panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            for problem in check_expression(target["expr"], series, target.get("legendFormat", "")):
                problems.append(f"dashboard panel {panel['title']!r}: {problem}")
    for variable in dashboard()["templating"]["list"]:
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        problems += [f"variable {variable['name']}: {p}" for p in check_expression(text, series)]
    for rule in alert_rules():
        problems += [f"alert {rule['alert']}: {p}" for p in check_expression(rule["expr"], series)]
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- Prometheus


def test_prometheus_config_and_its_rule_files_pass_promtool():
    run = promtool("check", "config", PROMETHEUS_YML)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 rule files found" in run.stdout  # alerts.yml, found relative to the config


def test_alert_rules_pass_promtool_and_cover_what_operators_must_hear_about():
    run = promtool("check", "rules", ALERTS_YML)
    assert run.returncode == 0, run.stdout + run.stderr
    rules = {rule["alert"]: rule for rule in alert_rules()}
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    exprs = "\n".join(rule["expr"] for rule in rules.values())
    for needle in (
        "plugboard_ready == 0",
        'plugboard_adapter_loads_total{outcome="corrupt"}',
        "plugboard_waiting_requests",
        'code="RESOURCE_EXHAUSTED"',
        "histogram_quantile(0.99",
    ):
        assert needle in exprs, f"no alert on {needle}"


def test_alerts_fire_when_they_should(tmp_path):
    """promtool's rule unit tests: synthetic series in, the expected alerts (and only those) out.

    On a copy of the rules without annotations: promtool would compare the rendered texts too, and
    `promtool check rules` above already checks their templates.
    """
    rules = load_yaml(ALERTS_YML)
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    target = {"instance": "pb:9400", "job": "plugboard"}

    def series(metric: str, values: str, **labels: str) -> dict[str, str]:
        selector = ", ".join(f'{k}="{v}"' for k, v in {**target, **labels}.items())
        return {"series": f"{metric}{{{selector}}}", "values": values}

    def expect(at: str, alert: str, *fired: dict[str, str]) -> dict[str, Any]:
        return {
            "eval_time": at,
            "alertname": alert,
            "exp_alerts": [{"exp_labels": labels} for labels in fired],
        }

    critical, warning = {**target, "severity": "critical"}, {**target, "severity": "warning"}
    by_instance = {"instance": "pb:9400", "severity": "warning"}  # rules that sum by (instance)
    inputs = [
        series("up", "1 1 0x10"),
        series("plugboard_ready", "1 0x10"),
        series("plugboard_adapter_loads_total", "0 0 1x10", tier="disk", outcome="corrupt"),
        series("plugboard_adapter_loads_total", "0+5x12", tier="disk", outcome="ok"),
        series("plugboard_waiting_requests", "0x10 1+2x30"),  # empty for 10 minutes, then growing
        series("plugboard_registry_stale_reads_total", "0x5 1+1x20"),  # the store is gone from minute 6
        series("plugboard_requests_total", "0+30x30", method="Generate", code="RESOURCE_EXHAUSTED"),
        # every Generate call took between 30 and 60 s: p99 ~ 60 s
        series("plugboard_request_duration_seconds_bucket", "0x30", method="Generate", le="30"),
        series("plugboard_request_duration_seconds_bucket", "0+10x30", method="Generate", le="60"),
        series("plugboard_request_duration_seconds_bucket", "0+10x30", method="Generate", le="+Inf"),
    ]
    checks = [
        expect("2m", "PlugboardTargetDown"),
        expect("5m", "PlugboardTargetDown", critical),
        expect("5m", "PlugboardNotReady"),
        expect("7m", "PlugboardNotReady", critical),
        expect("1m", "PlugboardCorruptModule"),
        expect("3m", "PlugboardCorruptModule", {**critical, "tier": "disk", "outcome": "corrupt"}),
        expect("10m", "PlugboardModuleLoadErrors"),
        expect("8m", "PlugboardRegistryUnreachable"),
        expect("13m", "PlugboardRegistryUnreachable", warning),
        expect("18m", "PlugboardQueueGrowing"),
        expect("28m", "PlugboardQueueGrowing", warning),
        expect("12m", "PlugboardRefusingRequests", by_instance),
        expect("5m", "PlugboardHighLatencyP99"),
        expect("20m", "PlugboardHighLatencyP99", by_instance),
        expect("20m", "PlugboardHighTimeToFirstTokenP99"),
        expect("20m", "PlugboardInternalErrors"),
    ]
    assert {check["alertname"] for check in checks} == {rule["alert"] for rule in alert_rules()}
    tests = {
        "rule_files": ["alerts.yml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": inputs, "alert_rule_test": checks}],
    }
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    run = promtool("test", "rules", path)
    assert run.returncode == 0, run.stdout + run.stderr


# ----------------------------------------------------------------------------- the Grafana dashboard


def test_every_dashboard_query_is_valid_promql(tmp_path):
    """Each query, its Grafana variables substituted, becomes a recording rule that promtool parses."""
    queries = dashboard_queries()
    assert len(queries) >= 20
    rules = [
        {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)}
        for i, (_, expr) in enumerate(queries)
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run = promtool("check", "rules", path)
    if run.returncode != 0:
        failing = sorted({int(i) for i in re.findall(r"dashboard:query_(\d+)", run.stdout + run.stderr)})
        where = "\n".join(f"dashboard:query_{i} is {queries[i][0]}: {queries[i][1]}" for i in failing)
        pytest.fail(f"{run.stdout}{run.stderr}\n{where}")
    assert f"SUCCESS: {len(rules)} rules found" in run.stdout


@pytest.mark.parametrize(
    ("topic", "pattern"),
    [
        ("readiness", r"plugboard_ready\b"),
        ("requests / s", r"rate\(plugboard_requests_total"),
        ("tokens / s", r"rate\(plugboard_generated_tokens_total"),
        ("latency p50", r"histogram_quantile\(0\.5, .*plugboard_request_duration_seconds_bucket"),
        ("latency p90", r"histogram_quantile\(0\.9, .*plugboard_request_duration_seconds_bucket"),
        ("latency p99", r"histogram_quantile\(0\.99, .*plugboard_request_duration_seconds_bucket"),
        ("time to first token", r"histogram_quantile\(.*plugboard_time_to_first_token_seconds_bucket"),
        ("batch size", r"plugboard_batch_size_(bucket|sum)"),
        ("waiting queue", r"plugboard_waiting_requests\b"),
        ("running batch", r"plugboard_running_requests\b"),
        ("module cache hits", r'plugboard_adapter_cache_total\{[^}]*result="hit"'),
        ("module loads", r"plugboard_adapter_loads_total"),
        ("module evictions", r"plugboard_adapter_evictions_total"),
        ("top modules by requests", r"topk\(\d+, .*plugboard_adapter_requests_total"),
        ("top modules by tokens", r"topk\(\d+, .*plugboard_adapter_generated_tokens_total"),
    ],
)
def test_the_dashboard_shows(topic, pattern):
    assert any(re.search(pattern, expr) for _, expr in dashboard_queries()), f"no panel shows {topic}"


def test_the_dashboard_is_in_grafanas_provisioning_format():
    board = dashboard()
    assert board.get("id") is None  # a provisioned dashboard gets its id from Grafana
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    panels = list(iter_panels(board["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        assert panel["type"] and panel["title"], panel["id"]
        grid = panel["gridPos"]
        assert set(grid) >= {"h", "w", "x", "y"}, panel["title"]
        assert 0 <= grid["x"] < grid["x"] + grid["w"] <= 24, f"{panel['title']!r} is off Grafana's 24 columns"
        for x in range(grid["x"], grid["x"] + grid["w"]):  # overlapping panels render on top of each other
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[x, y]!r}"
                cells[x, y] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target.get("datasource", DATASOURCE) == DATASOURCE, panel["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["instance"]["datasource"] == DATASOURCE
    assert all('instance=~"$instance"' in expr for _, expr in dashboard_queries()), (
        "a query ignores $instance"
    )


def test_grafana_provisioning_points_at_the_mounted_dashboards_and_the_datasource_uid():
    (datasource_file,) = (GRAFANA_PROVISIONING / "datasources").glob("*.yaml")
    (provider_file,) = (GRAFANA_PROVISIONING / "dashboards").glob("*.yaml")
    datasources = load_yaml(datasource_file)
    providers = load_yaml(provider_file)
    assert datasources["apiVersion"] == 1 and providers["apiVersion"] == 1
    (source,) = datasources["datasources"]
    assert {"type": source["type"], "uid": source["uid"]} == DATASOURCE
    services = compose()["services"]
    prometheus_port = next(int(p.split(":")[-1]) for p in services["prometheus"]["ports"])
    assert source["url"] == f"http://prometheus:{prometheus_port}"
    scrape_interval = load_yaml(PROMETHEUS_YML)["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape_interval  # what $__rate_interval builds on
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    mounts = bind_mounts(services["grafana"])
    assert mounts[provider["options"]["path"]] == DASHBOARD_JSON.parent
    assert mounts["/etc/grafana/provisioning"] == GRAFANA_PROVISIONING
    home = PurePosixPath(services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert mounts[str(home.parent)] / home.name == DASHBOARD_JSON
