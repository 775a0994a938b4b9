"""The deploy/ files the tests read, and the tools they run (promtool from Debian's prometheus)."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from plugboard_server.config import ServerConfig
from tests.support.tools import missing_tool

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_YML = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD_JSON = DEPLOY / "grafana" / "dashboards" / "plugboard.json"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"
COMPOSE_YAML = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
CACHE_VOLUME, REGISTRY_VOLUME = "/var/cache/plugboard", "/var/lib/plugboard/registry"
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"instance", "job"})


def require_tool(name: str) -> str:
    """The path of `name`; a missing tool fails under CI (.ci/run installs it) and skips elsewhere."""
    path = shutil.which(name)
    if path:
        return path
    reason = f"{name} is not installed: apt-get install prometheus (Debian's package; .ci/run installs it)"
    missing_tool(reason)


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("promtool"), *map(str, args)], capture_output=True, text=True, timeout=60
    )


def server_variables() -> set[str]:
    """PLUGBOARD_* variables the server reads: one per ServerConfig field."""
    return {f"PLUGBOARD_{field.name.upper()}" for field in dataclasses.fields(ServerConfig)}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_YAML)


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> repository path of a service's bind mounts (short syntax, ./ or ../ sources)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, _, rest = volume.partition(":")
        if source.startswith("."):
            mounts[rest.split(":")[0]] = (COMPOSE_YAML.parent / source).resolve()
    return mounts
