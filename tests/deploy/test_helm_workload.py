"""The Helm chart's workload: image and GPU, volumes, security, selectors, metrics, autoscaling, refusals."""

from __future__ import annotations

import re
from typing import Any

import helm_python as helm
import pytest
import yaml

from tests.deploy.helm_support import (
    CHART_DIR,
    FULLNAME,
    NAMESPACE,
    VARIANTS,
    by_kind,
    deployment,
    flag,
    matches,
    one,
    render,
    render_files,
    server_container,
)


def test_server_settings_become_flags(chart: helm.Chart) -> None:
    """Server values become flags (whole numbers without exponent); extraArgs come last; extraEnv is set."""
    deploy = deployment(chart, VARIANTS["open-emptydir-extras"])
    container = server_container(deploy)
    args = container["args"]
    assert flag(args, "--max-queued-requests") == "1048576"
    assert flag(args, "--grace-period") == "120.5"
    assert flag(args, "--device") == "cuda:1"
    assert flag(args, "--max-batch-size") is None  # null: the server's default
    assert flag(args, "--model") == "/models/tiny"
    assert args[-2:] == ["--max-batch-tokens", "131072"]
    assert {"name": "PLUGBOARD_THREADS", "value": "8"} in container["env"]
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]


# --- image and GPU -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "image"),
    [
        ({}, "ghcr.io/plugboard/plugboard:0.1.0"),
        ({"gpu": {"enabled": True}}, "ghcr.io/plugboard/plugboard:0.1.0-cuda"),
        (
            {"gpu": {"enabled": True}, "image": {"tag": "0.2.0-cuda"}},
            "ghcr.io/plugboard/plugboard:0.2.0-cuda",
        ),
        ({"image": {"repository": "r.example/pb", "tag": "dev"}}, "r.example/pb:dev"),
        ({"image": {"digest": "sha256:" + "a" * 64}}, "ghcr.io/plugboard/plugboard@sha256:" + "a" * 64),
    ],
    ids=["appVersion", "cuda-suffix", "cuda-suffix-once", "custom", "digest"],
)
def test_image_reference(chart: helm.Chart, values: dict[str, Any], image: str) -> None:
    """The tag defaults to the chart's appVersion; GPUs select the -cuda image."""
    assert chart.metadata["appVersion"] == "0.1.0"
    assert server_container(deployment(chart, values))["image"] == image


@pytest.mark.parametrize("enabled", [False, True])
def test_gpu_limit_only_when_enabled(chart: helm.Chart, enabled: bool) -> None:
    """nvidia.com/gpu is limited to gpu.count with GPUs on, absent otherwise; GPU nodes' taint tolerated."""
    deploy = deployment(
        chart, {"gpu": {"enabled": enabled, "count": 2}, "tolerations": [{"key": "x", "operator": "Exists"}]}
    )
    resources = server_container(deploy)["resources"]
    pod = deploy["spec"]["template"]["spec"]
    gpu_toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    if enabled:
        assert resources["limits"]["nvidia.com/gpu"] == 2
        assert resources["limits"]["memory"] == "4Gi"  # the configured limits stay
        assert gpu_toleration in pod["tolerations"]
    else:
        assert "nvidia.com/gpu" not in resources.get("limits", {})
        assert "nvidia.com/gpu" not in resources.get("requests", {})
        assert gpu_toleration not in pod["tolerations"]
    assert {"key": "x", "operator": "Exists"} in pod["tolerations"]


# --- pod shape -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_volumes_and_mounts_pair_up(chart: helm.Chart, variant: str) -> None:
    """Every mount has its volume and every volume is mounted; mount paths are distinct."""
    deploy = deployment(chart, VARIANTS[variant])
    volumes = [v["name"] for v in deploy["spec"]["template"]["spec"]["volumes"]]
    mounts = server_container(deploy)["volumeMounts"]
    assert len(volumes) == len(set(volumes))
    assert {m["name"] for m in mounts} == set(volumes)
    assert len({m["mountPath"] for m in mounts}) == len(mounts)


@pytest.mark.parametrize("variant", VARIANTS)
def test_runs_non_root_on_a_read_only_root_filesystem(chart: helm.Chart, variant: str) -> None:
    """Non-root uid/gid 10001, no privilege escalation, no capabilities; the writable paths are volumes."""
    deploy = deployment(chart, VARIANTS[variant])
    pod = deploy["spec"]["template"]["spec"]
    container = server_container(deploy)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["fsGroup"]) == (10001, 10001)
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert {"/tmp", "/var/cache/plugboard"} <= writable
    assert flag(container["args"], "--cache-dir") == "/var/cache/plugboard"
    assert pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize(
    ("values", "expected"),
    [({}, 45), ({"server": {"gracePeriod": 120.5}}, 136), ({"terminationGracePeriodSeconds": 31}, 31)],
)
def test_termination_grace_exceeds_the_drain(
    chart: helm.Chart, values: dict[str, Any], expected: int
) -> None:
    """The kubelet waits longer than the server's --grace-period drain before it kills the container."""
    deploy = deployment(chart, values)
    grace = float(flag(server_container(deploy)["args"], "--grace-period"))
    assert deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == expected
    assert expected > grace


@pytest.mark.parametrize("variant", VARIANTS)
def test_selectors_match_the_pods(chart: helm.Chart, variant: str) -> None:
    """Deployment, Services and PDB select the pods; Service target ports are named container ports."""
    objects = render(chart, VARIANTS[variant])
    deploy = one(objects, "Deployment")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert matches(deploy["spec"]["selector"], pod_labels)
    port_names = {p["name"] for p in server_container(deploy)["ports"]}
    for service in by_kind(objects, "Service"):
        assert matches(service["spec"]["selector"], pod_labels)
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    for pdb in by_kind(objects, "PodDisruptionBudget"):
        assert matches(pdb["spec"]["selector"], pod_labels)


def test_service_ports(chart: helm.Chart) -> None:
    """The ClusterIP Service carries gRPC (appProtocol grpc) and metrics; the headless one only gRPC."""
    services = {
        s["metadata"]["name"]: s for s in by_kind(render(chart, VARIANTS["gpu-hpa-monitoring"]), "Service")
    }
    main, headless = services[FULLNAME], services[f"{FULLNAME}-headless"]
    ports = {p["name"]: p for p in main["spec"]["ports"]}
    assert (ports["grpc"]["port"], ports["grpc"]["appProtocol"]) == (50051, "grpc")
    assert ports["metrics"]["port"] == 9400
    assert main["spec"]["type"] == "ClusterIP"
    assert headless["spec"]["clusterIP"] == "None"
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]
    defaults = by_kind(render(chart, {}), "Service")
    assert [s["metadata"]["name"] for s in defaults] == [FULLNAME]  # headless only when asked


# --- metrics -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["defaults", "s3-created-credentials"])
def test_scrape_annotations_name_the_metrics_port(chart: helm.Chart, variant: str) -> None:
    """prometheus.io/port is the port the server's --metrics-port listens on."""
    deploy = deployment(chart, VARIANTS[variant])
    annotations = deploy["spec"]["template"]["metadata"]["annotations"]
    container = server_container(deploy)
    metrics_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert (
        int(annotations["prometheus.io/port"])
        == metrics_port
        == int(flag(container["args"], "--metrics-port"))
    )


def test_scrape_annotations_can_be_turned_off(chart: helm.Chart) -> None:
    """With the ServiceMonitor in use the annotations go, so pods are not scraped twice."""
    annotations = deployment(chart, VARIANTS["gpu-hpa-monitoring"])["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert not [k for k in annotations if k.startswith("prometheus.io/")]


def test_service_monitor_scrapes_the_main_service_only(chart: helm.Chart) -> None:
    """The ServiceMonitor selects the ClusterIP Service (not the headless one) and its metrics port."""
    objects = render(chart, VARIANTS["gpu-hpa-monitoring"])
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    selected = [
        s
        for s in by_kind(objects, "Service")
        if matches(monitor["spec"]["selector"], s["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in selected] == [FULLNAME]
    port_names = {p["name"] for p in selected[0]["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"])


def test_service_monitor_off_by_default(chart: helm.Chart) -> None:
    """No ServiceMonitor unless asked (its CRD may not exist in the cluster)."""
    assert by_kind(render(chart, {}), "ServiceMonitor") == []


# --- autoscaling ---------------------------------------------------------------------------------------


def plugboard_metric_names() -> set[str]:
    """The names of the metrics the server exports (as Prometheus exposes them)."""
    from plugboard_server.metrics import Metrics

    return {metric.name for metric in Metrics().registry.collect()}


def test_hpa_scales_the_deployment_on_waiting_requests(chart: helm.Chart) -> None:
    """The HPA targets this Deployment, on plugboard_waiting_requests per pod, plus the CPU target."""
    objects = render(chart, VARIANTS["gpu-hpa-monitoring"])
    hpa, deploy = one(objects, "HorizontalPodAutoscaler"), one(objects, "Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deploy["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods == [
        {
            "metric": {"name": "plugboard_waiting_requests"},
            "target": {"type": "AverageValue", "averageValue": "8"},
        }
    ]
    resources = [m["resource"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert resources == [{"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}]
    # The HPA owns the replica count: a replicas field would reset it on every upgrade.
    assert "replicas" not in deploy["spec"]


def test_replicas_set_without_hpa(chart: helm.Chart) -> None:
    """Without autoscaling the Deployment carries replicaCount and there is no HPA."""
    objects = render(chart, VARIANTS["s3-created-credentials"])
    assert one(objects, "Deployment")["spec"]["replicas"] == 3
    assert by_kind(objects, "HorizontalPodAutoscaler") == []


def test_hpa_metric_is_a_real_plugboard_metric(chart: helm.Chart) -> None:
    """The gauge the HPA scales on is one the server exports (renaming it must break this test)."""
    names = plugboard_metric_names()
    assert "plugboard_waiting_requests" in names
    hpa = one(render(chart, VARIANTS["gpu-hpa-monitoring"]), "HorizontalPodAutoscaler")
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "Pods":
            assert metric["pods"]["metric"]["name"] in names


def test_readme_adapter_rule_serves_the_hpa_metric() -> None:
    """The prometheus-adapter rule in the chart README exposes the metric the HPA asks for, per pod."""
    readme = (CHART_DIR / "README.md").read_text()
    rules = []
    for block in re.findall(r"```yaml\n(.*?)```", readme, flags=re.S):
        doc = yaml.safe_load(block)
        if isinstance(doc, dict) and isinstance(doc.get("rules"), dict):
            rules += doc["rules"].get("custom", [])
    assert rules, "no prometheus-adapter rules block in README.md"
    (rule,) = [r for r in rules if "plugboard_waiting_requests" in r["seriesQuery"]]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    assert rule["name"].get("as", rule["name"]["matches"]) == "plugboard_waiting_requests"
    assert rule["name"]["matches"].strip("^$") in plugboard_metric_names()


# --- values that must be refused -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        {"registry": {"type": "ftp"}},
        {"replicaCount": -1},
        {"replicaCount": "two"},
        {"registyr": {"type": "pvc"}},
        {"gpu": {"enabled": True, "count": 0}},
        {"server": {"port": 70000}},
        {"server": {"dtype": "int4"}},
        {"server": {"logLevel": "verbose"}},
        {"server": {"maxBatchSize": 0}},
        {"autoscaling": {"minReplicas": 0}},
        {"registry": {"type": "s3"}},
        {"registry": {"type": "s3", "s3": {"bucket": "bkt", "endpointUrl": "minio:9000"}}},
        {"tls": {"enabled": True}},
        {"registry": {"type": "s3", "s3": {"bucket": "Bad_Bucket"}}},
        {"registry": {"type": "s3", "s3": {"bucket": "bkt", "cacheSize": "20GB"}}},
        {"auth": {"admin": {"token": "has a space"}}},
        {"image": {"pullPolicy": "Sometimes"}},
    ],
    ids=lambda v: str(v),
)
def test_schema_rejects_bad_values(chart: helm.Chart, values: dict[str, Any]) -> None:
    """values.schema.json refuses them, and so does a render (install) with them."""
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmValuesError):
        render(chart, values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": 2}, "ReadWriteOnce"),
        ({"autoscaling": {"enabled": True, "maxReplicas": 3}}, "ReadWriteOnce"),
        (
            {
                "registry": {"type": "emptyDir"},
                "autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2},
            },
            "minReplicas",
        ),
        (
            {
                "registry": {"type": "emptyDir"},
                "autoscaling": {"enabled": True, "waitingRequests": {"enabled": False}},
            },
            "needs a metric",
        ),
        ({"terminationGracePeriodSeconds": 30}, "must exceed server.gracePeriod"),
        ({"tls": {"enabled": True, "secretName": "t", "mutual": True}}, "probeClientSecretName"),
        (
            {"auth": {"admin": {"token": "same"}, "inference": {"enabled": True, "token": "same"}}},
            "must differ",
        ),
        ({"registry": {"type": "s3", "s3": {"bucket": "bkt", "accessKeyId": "id"}}}, "secretAccessKey"),
    ],
    ids=[
        "rwo-replicas",
        "rwo-hpa",
        "min-over-max",
        "hpa-no-metric",
        "grace",
        "mtls-probe",
        "same-tokens",
        "s3-half-key",
    ],
)
def test_render_refuses_inconsistent_values(chart: helm.Chart, values: dict[str, Any], message: str) -> None:
    """Combinations the schema cannot express fail the render with a message naming the fix."""
    assert chart.validate_schema(values) is None
    with pytest.raises(helm.HelmError, match=message):
        render(chart, values)


def test_notes_render(chart: helm.Chart) -> None:
    """NOTES.txt tells how to reach the server and read the generated token."""
    notes = render_files(chart, {})["NOTES.txt"]
    assert f"port-forward service/{FULLNAME} 50051:50051" in notes
    assert f"get secret {FULLNAME}-auth -o jsonpath='{{.data.admin}}'" in notes
    open_notes = render_files(chart, {"auth": {"admin": {"enabled": False}}})["NOTES.txt"]
    assert "WARNING: no tokens are required" in open_notes
