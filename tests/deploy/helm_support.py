"""What the Helm chart's tests share: the value sets they render, rendering, and reading the objects.

Rendered offline by Helm's own Go SDK (helm-python-sdk, no helm binary, no cluster); every object of a
core kind is checked against the Kubernetes OpenAPI schemas with unknown fields rejected, for the oldest
Kubernetes the chart supports and the newest the validator knows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

CHART_DIR = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "plugboard"
RELEASE = "rel"
NAMESPACE = "ml"
FULLNAME = "rel-plugboard"
# The chart's kubeVersion floor (native grpc probes) and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.27", kubernetes_validate.utils.major_minor(kubernetes_validate.utils.latest_version()))

# Value sets a deployment would plausibly use; each is linted, rendered and schema-checked.
VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "gpu-hpa-monitoring": {
        "gpu": {"enabled": True, "count": 2},
        "autoscaling": {
            "enabled": True,
            "minReplicas": 2,
            "maxReplicas": 8,
            "targetCPUUtilizationPercentage": 80,
        },
        "metrics": {
            "podAnnotations": False,
            "serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
        },
        "podDisruptionBudget": {"enabled": True, "minAvailable": 1},
        "registry": {"pvc": {"accessModes": ["ReadWriteMany"], "storageClass": "nfs"}},
        "service": {"headless": {"enabled": True}},
        "server": {"dtype": "bfloat16", "maxBatchSize": 64, "maxLoadedAdapters": 48},
    },
    "s3-created-credentials": {
        "replicaCount": 3,
        "registry": {
            "type": "s3",
            "s3": {
                "bucket": "modules",
                "prefix": "/prod/plugboard/",
                "endpointUrl": "http://minio.minio.svc:9000",
                "region": "us-east-1",
                "accessKeyId": "AKIAEXAMPLE",
                "secretAccessKey": "c2VjcmV0",
            },
        },
    },
    "s3-irsa": {
        "registry": {"type": "s3", "s3": {"bucket": "modules"}},
        "serviceAccount": {
            "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/pb"}
        },
    },
    "pvc-existing-claim": {
        "replicaCount": 2,
        "registry": {"pvc": {"existingClaim": "shared-registry"}},
        "modelCache": {"type": "pvc", "pvc": {"size": "50Gi"}},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
    },
    "tls-mtls-existing-tokens": {
        "tls": {
            "enabled": True,
            "secretName": "plugboard-tls",
            "mutual": True,
            "probeClientSecretName": "plugboard-probe-tls",
        },
        "auth": {
            "existingSecret": "plugboard-tokens",
            "admin": {"key": "admin-token"},
            "inference": {"enabled": True, "key": "inference-token"},
        },
    },
    "tls-server-only": {"tls": {"enabled": True, "secretName": "plugboard-tls", "serverName": "pb.example"}},
    "tokens-created": {
        "auth": {
            "admin": {"token": "admin-secret-1"},
            "inference": {"enabled": True, "token": "inf-secret-2"},
        }
    },
    "open-emptydir-extras": {
        "auth": {"admin": {"enabled": False}},
        "registry": {"type": "emptyDir"},
        "server": {
            "model": "/models/tiny",
            "maxQueuedRequests": 1048576,
            "gracePeriod": 120.5,
            "device": "cuda:1",
        },
        "extraArgs": ["--max-batch-tokens", "131072"],
        "extraEnv": [{"name": "PLUGBOARD_THREADS", "value": "8"}],
        "extraVolumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}],
        "extraVolumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}},
    },
}

TLS_VARIANTS = {"tls-mtls-existing-tokens", "tls-server-only"}


def render_files(chart: helm.Chart, values: dict[str, Any]) -> dict[str, str]:
    """Render as `helm install` would, keyed by file name (deployment.yaml, NOTES.txt, ...)."""
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return {Path(path).name: text for path, text in out.items()}


def render(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object the chart renders for `values`."""
    return [
        doc
        for name, text in render_files(chart, values).items()
        if name.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The objects of one kind."""
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The single object of `kind`; fails when there is none or more than one."""
    found = by_kind(objects, kind)
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def deployment(chart: helm.Chart, values: dict[str, Any]) -> dict[str, Any]:
    """The rendered Deployment."""
    return one(render(chart, values), "Deployment")


def server_container(deploy: dict[str, Any]) -> dict[str, Any]:
    """The plugboard-server container of the Deployment."""
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    return container


def flag(args: list[str], name: str) -> str | None:
    """The value after the last occurrence of `name` in `args` (the server's argparse takes the last)."""
    values = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == name]
    return values[-1] if values else None


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, or a LabelSelector with matchExpressions) selects `labels`."""
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}  # a Service's plain map
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def mounted_file(deploy: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    """The volume that provides file `path` in the server container, and the path inside that volume."""
    mounts = server_container(deploy)["volumeMounts"]
    mount = max(
        (m for m in mounts if path.startswith(m["mountPath"].rstrip("/") + "/")),
        key=lambda m: len(m["mountPath"]),
        default=None,
    )
    assert mount is not None, f"{path} is on no volume"
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
    return volumes[mount["name"]], path[len(mount["mountPath"].rstrip("/")) + 1 :]


# --- lint and schemas ----------------------------------------------------------------------------------
