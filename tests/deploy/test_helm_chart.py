"""The Helm chart (deploy/helm/plugboard): lint, Kubernetes schemas, probes, flags, registry, secrets.

Rendered offline by Helm's own Go SDK (helm-python-sdk, no helm binary, no cluster); every object of a
core kind is checked against the Kubernetes OpenAPI schemas with unknown fields rejected, for the oldest
Kubernetes the chart supports and the newest the validator knows.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from tests.deploy.helm_support import (
    CHART_DIR,
    FULLNAME,
    KUBE_VERSIONS,
    NAMESPACE,
    RELEASE,
    TLS_VARIANTS,
    VARIANTS,
    by_kind,
    deployment,
    flag,
    mounted_file,
    one,
    render,
    render_files,
    server_container,
)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lint_strict_passes(variant: str) -> None:
    """`helm lint --strict` finds nothing above INFO for each value set, on the oldest Kubernetes."""
    report = helm.lint(CHART_DIR, VARIANTS[variant], strict=True, kube_version="v1.27.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_objects_valid_against_kubernetes_schema(chart: helm.Chart, variant: str, kube_version: str) -> None:
    """Every core object is valid for the Kubernetes version, unknown fields rejected (a typo fails)."""
    objects = render(chart, VARIANTS[variant])
    core = [o for o in objects if not o["apiVersion"].startswith("monitoring.coreos.com/")]
    assert core
    for obj in core:
        kubernetes_validate.validate(obj, kube_version, strict=True)
        assert obj["metadata"]["namespace"] == NAMESPACE
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


def test_default_objects(chart: helm.Chart) -> None:
    """Defaults: Deployment, Service, registry claim, admin-token Secret, ServiceAccount; nothing optional."""
    kinds = sorted(o["kind"] for o in render(chart, {}))
    assert kinds == ["Deployment", "PersistentVolumeClaim", "Secret", "Service", "ServiceAccount"]


# --- probes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(set(VARIANTS) - TLS_VARIANTS))
def test_plaintext_probes_are_native_grpc_health_checks(chart: helm.Chart, variant: str) -> None:
    """Without TLS the kubelet asks grpc.health.v1 on the gRPC port; readiness waits for Generation."""
    container = server_container(deployment(chart, VARIANTS[variant]))
    probes = {kind: container[f"{kind}Probe"] for kind in ("startup", "liveness", "readiness")}
    for probe in probes.values():
        assert set(probe) & {"grpc", "exec", "httpGet", "tcpSocket"} == {"grpc"}
        assert probe["grpc"]["port"] == 50051
    assert probes["startup"]["grpc"]["service"] == ""
    assert probes["liveness"]["grpc"]["service"] == ""
    assert probes["readiness"]["grpc"]["service"] == "plugboard.v1.Generation"
    # Model loading may take minutes: the startup probe must allow at least two before the kubelet restarts.
    startup = probes["startup"]["periodSeconds"] * probes["startup"]["failureThreshold"]
    assert startup >= 120
    assert {"containerPort": 50051, "name": "grpc", "protocol": "TCP"} in container["ports"]


@pytest.mark.parametrize("variant", sorted(TLS_VARIANTS))
def test_tls_probes_run_the_cli_health_check(chart: helm.Chart, variant: str) -> None:
    """With TLS (which grpc probes cannot speak) the probes run `plugboard health` over TLS on 127.0.0.1."""
    from plugboard_client.cli import build_parser

    values = VARIANTS[variant]
    deploy = deployment(chart, values)
    container = server_container(deploy)
    for kind, service in (("startup", ""), ("liveness", ""), ("readiness", "plugboard.v1.Generation")):
        probe = container[f"{kind}Probe"]
        assert "grpc" not in probe
        command = probe["exec"]["command"]
        assert command[0] == "plugboard"
        # The command must parse with the CLI's own parser (a renamed option fails here).
        args = build_parser().parse_args(command[1:])
        assert (args.command, args.service, args.target) == ("health", service, "127.0.0.1:50051")
        assert args.timeout == probe["timeoutSeconds"]
        assert args.tls_server_name == values["tls"].get("serverName", f"{FULLNAME}.{NAMESPACE}.svc")
        volume, key = mounted_file(deploy, str(args.tls_ca))
        assert (volume["secret"]["secretName"], key) == (values["tls"]["secretName"], "ca.crt")
        if values["tls"].get("mutual"):
            for path, expected in ((args.tls_cert, "tls.crt"), (args.tls_key, "tls.key")):
                volume, key = mounted_file(deploy, str(path))
                assert (volume["secret"]["secretName"], key) == (
                    values["tls"]["probeClientSecretName"],
                    expected,
                )
        else:
            assert args.tls_cert is None and args.tls_key is None


# --- server arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_args_are_server_flags(chart: helm.Chart, variant: str) -> None:
    """Every argument the chart passes parses with plugboard-server's own parser (a renamed flag fails)."""
    from plugboard_server.config import ServerConfig

    args = server_container(deployment(chart, VARIANTS[variant]))["args"]
    assert all(isinstance(a, str) for a in args)
    parsed = ServerConfig.parser().parse_args(args)
    # Unset, the image's own model (converted at build time, PLUGBOARD_MODEL) serves.
    assert ("--model" in args) == bool(VARIANTS[variant].get("server", {}).get("model"))
    # Inside a pod the server must listen beyond loopback for the Service and the kubelet's probes.
    assert (parsed.host, parsed.port, parsed.metrics_host, parsed.metrics_port) == (
        "0.0.0.0",
        50051,
        "0.0.0.0",
        9400,
    )


@pytest.mark.parametrize(
    ("values", "registry", "cache_dir", "endpoint"),
    [
        ({}, "/var/lib/plugboard/registry", None, None),
        ({"registry": {"type": "emptyDir"}}, "/var/lib/plugboard/registry", None, None),
        ({"registry": {"pvc": {"existingClaim": "shared"}}}, "/var/lib/plugboard/registry", None, None),
        (
            {
                "registry": {
                    "type": "s3",
                    "s3": {"bucket": "bkt", "prefix": "/a/b/", "endpointUrl": "http://m:9000"},
                }
            },
            "s3://bkt/a/b",
            "/var/lib/plugboard/registry-cache",
            "http://m:9000",
        ),
        (
            {"registry": {"type": "s3", "s3": {"bucket": "bkt"}}},
            "s3://bkt",
            "/var/lib/plugboard/registry-cache",
            None,
        ),
    ],
    ids=["pvc", "emptyDir", "existing-claim", "s3-prefix-endpoint", "s3-bucket-only"],
)
def test_registry_argument_per_type(
    chart: helm.Chart, values: dict[str, Any], registry: str, cache_dir: str | None, endpoint: str | None
) -> None:
    """--registry names the mounted directory or the s3:// location; S3 gets its download cache volume."""
    deploy = deployment(chart, values)
    args = server_container(deploy)["args"]
    assert flag(args, "--registry") == registry
    assert flag(args, "--registry-cache-dir") == cache_dir
    assert flag(args, "--registry-endpoint-url") == endpoint
    local = registry if cache_dir is None else cache_dir
    volume, rest = mounted_file(deploy, local + "/index")
    assert rest == "index"
    kind = values.get("registry", {}).get("type", "pvc")
    if kind == "pvc":
        claim = values.get("registry", {}).get("pvc", {}).get("existingClaim") or f"{FULLNAME}-registry"
        assert volume["persistentVolumeClaim"]["claimName"] == claim
    else:
        assert "emptyDir" in volume


@pytest.mark.parametrize(
    ("size", "limit_bytes"), [("20Gi", 20 << 30), ("512Mi", 512 << 20), ("2Ti", 2 << 40)]
)
def test_s3_cache_budget_fits_its_volume(chart: helm.Chart, size: str, limit_bytes: int) -> None:
    """--registry-cache-bytes stays below the emptyDir's limit: outgrowing it gets the pod evicted."""
    deploy = deployment(chart, {"registry": {"type": "s3", "s3": {"bucket": "bkt", "cacheSize": size}}})
    volume, _ = mounted_file(deploy, "/var/lib/plugboard/registry-cache/x")
    assert volume["emptyDir"]["sizeLimit"] == size
    budget = int(flag(server_container(deploy)["args"], "--registry-cache-bytes"))
    assert budget == limit_bytes * 4 // 5


def test_registry_claim_created_only_without_existing_claim(chart: helm.Chart) -> None:
    """The chart creates the registry claim unless told to use an existing one."""
    created = by_kind(render(chart, {}), "PersistentVolumeClaim")
    assert [c["metadata"]["name"] for c in created] == [f"{FULLNAME}-registry"]
    assert created[0]["spec"]["resources"]["requests"]["storage"] == "10Gi"
    existing = render(chart, {"registry": {"pvc": {"existingClaim": "shared"}}})
    assert by_kind(existing, "PersistentVolumeClaim") == []


@pytest.mark.parametrize(
    ("values", "strategy"),
    [
        ({}, "Recreate"),  # a chart-made ReadWriteOnce claim: a surge pod on another node could not attach it
        ({"registry": {"pvc": {"accessModes": ["ReadWriteMany"]}}}, "RollingUpdate"),
        ({"registry": {"type": "s3", "s3": {"bucket": "bkt"}}}, "RollingUpdate"),
        ({"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}, "RollingUpdate"),
    ],
)
def test_update_strategy(chart: helm.Chart, values: dict[str, Any], strategy: str) -> None:
    """Recreate only where a rolling update would hang on the volume attachment."""
    assert deployment(chart, values)["spec"]["strategy"]["type"] == strategy


def test_s3_credentials_from_created_secret(chart: helm.Chart) -> None:
    """Credentials given as values land in a chart Secret and reach the standard AWS variables."""
    values = VARIANTS["s3-created-credentials"]
    objects = render(chart, values)
    env = {e["name"]: e for e in server_container(one(objects, "Deployment"))["env"]}
    secrets = {s["metadata"]["name"]: s for s in by_kind(objects, "Secret")}
    s3 = secrets[f"{FULLNAME}-s3"]
    for var, expected in (("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE"), ("AWS_SECRET_ACCESS_KEY", "c2VjcmV0")):
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == f"{FULLNAME}-s3"
        assert base64.b64decode(s3["data"][ref["key"]]).decode() == expected
    assert env["AWS_REGION"]["value"] == "us-east-1"


def test_s3_credentials_from_existing_secret(chart: helm.Chart) -> None:
    """An existing Secret is referenced by its keys and no credentials Secret is created."""
    values = {
        "registry": {
            "type": "s3",
            "s3": {
                "bucket": "bkt",
                "existingSecret": "aws",
                "accessKeyIdKey": "id",
                "secretAccessKeyKey": "key",
            },
        }
    }
    objects = render(chart, values)
    env = {e["name"]: e for e in server_container(one(objects, "Deployment"))["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "aws", "key": "id"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "aws", "key": "key"}
    assert all(not s["metadata"]["name"].endswith("-s3") for s in by_kind(objects, "Secret"))


def test_s3_without_credentials_uses_the_service_account_role(chart: helm.Chart) -> None:
    """No keys given: no AWS variables, so the SDK falls back to IRSA on the annotated ServiceAccount."""
    objects = render(chart, VARIANTS["s3-irsa"])
    deploy = one(objects, "Deployment")
    assert not {e["name"] for e in server_container(deploy)["env"]} & {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    }
    account = one(objects, "ServiceAccount")
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]


@pytest.mark.parametrize(
    ("values", "admin", "inference"),
    [
        ({}, "admin", None),
        (VARIANTS["tokens-created"], "admin", "inference"),
        (VARIANTS["tls-mtls-existing-tokens"], "admin-token", "inference-token"),
        ({"auth": {"admin": {"enabled": False}}}, None, None),
    ],
    ids=["default-admin", "created-both", "existing-secret", "no-tokens"],
)
def test_token_files_are_mounted_from_the_secret(
    chart: helm.Chart, values: dict[str, Any], admin: str | None, inference: str | None
) -> None:
    """--admin-token-file / --inference-token-file name files that the tokens Secret's keys provide."""
    deploy = deployment(chart, values)
    args = server_container(deploy)["args"]
    secret_name = values.get("auth", {}).get("existingSecret") or f"{FULLNAME}-auth"
    for option, key in (("--admin-token-file", admin), ("--inference-token-file", inference)):
        path = flag(args, option)
        if key is None:
            assert path is None
            continue
        volume, file = mounted_file(deploy, path)
        assert volume["secret"]["secretName"] == secret_name
        assert {"key": key, "path": file} in volume["secret"]["items"]


def test_created_tokens_hold_the_given_values(chart: helm.Chart) -> None:
    """Tokens given as values are stored as such, under the keys the volume maps."""
    secret = one(render(chart, VARIANTS["tokens-created"]), "Secret")
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == {"admin": "admin-secret-1", "inference": "inf-secret-2"}


def test_generated_admin_token_is_usable(chart: helm.Chart) -> None:
    """Without a value the chart generates a token the server accepts (printable ASCII, no spaces)."""
    secret = one(render(chart, {}), "Secret")
    token = base64.b64decode(secret["data"]["admin"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{48}", token)


@pytest.mark.parametrize("variant", ["defaults", "tokens-created", "s3-created-credentials"])
def test_checksum_annotation_covers_the_rendered_secrets(chart: helm.Chart, variant: str) -> None:
    """checksum/secret hashes exactly the Secrets applied: a changed (or generated) token rolls the pods."""
    files = render_files(chart, VARIANTS[variant])
    annotations = yaml.safe_load(files["deployment.yaml"])["spec"]["template"]["metadata"]["annotations"]
    assert annotations["checksum/secret"] == hashlib.sha256(files["secret.yaml"].encode()).hexdigest()


def test_existing_token_secret_is_not_created(chart: helm.Chart) -> None:
    """With auth.existingSecret the chart writes no Secret of its own."""
    assert by_kind(render(chart, VARIANTS["tls-mtls-existing-tokens"]), "Secret") == []


@pytest.mark.parametrize("variant", sorted(TLS_VARIANTS))
def test_tls_files_come_from_the_tls_secret(chart: helm.Chart, variant: str) -> None:
    """--tls-cert/--tls-key (and --tls-client-ca under mutual TLS) are the kubernetes.io/tls Secret's keys."""
    values = VARIANTS[variant]
    deploy = deployment(chart, values)
    args = server_container(deploy)["args"]
    expected = {"--tls-cert": "tls.crt", "--tls-key": "tls.key"}
    if values["tls"].get("mutual"):
        expected["--tls-client-ca"] = "ca.crt"
    else:
        assert flag(args, "--tls-client-ca") is None
    for option, key in expected.items():
        volume, file = mounted_file(deploy, flag(args, option))
        assert (volume["secret"]["secretName"], file) == (values["tls"]["secretName"], key)
    mount = next(m for m in server_container(deploy)["volumeMounts"] if m["name"] == "tls")
    assert mount["readOnly"] is True


def test_plaintext_passes_no_tls_flags(chart: helm.Chart) -> None:
    """Without TLS no certificate flags and no TLS volume."""
    deploy = deployment(chart, {})
    args = server_container(deploy)["args"]
    assert not [a for a in args if a.startswith("--tls")]
    assert "tls" not in {v["name"] for v in deploy["spec"]["template"]["spec"]["volumes"]}
