"""Publish a trained module: to a registry directory, or to a running server over gRPC.

Both targets publish atomically: a directory registry renames a fully written version into place
and commits it in one transaction; a server stores an upload only once its last chunk has arrived
and checked out. An interrupted publish (Ctrl-C included) therefore leaves no half-published
version behind, only the versions that were there before.
"""

from __future__ import annotations

import operator
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "BaseModelMismatch",
    "Condition",
    "PublishError",
    "Published",
    "RegistryTarget",
    "ServerTarget",
    "Target",
    "open_target",
]


class PublishError(RuntimeError):
    """The module cannot be published where asked; the message says why."""


class BaseModelMismatch(PublishError):
    """The target serves (or holds the module for) another base model than the one trained on."""


_OPERATORS: Mapping[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
}
_CONDITION = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|==|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Condition:
    """A promotion condition such as "accuracy>=0.9", checked against evaluation figures."""

    metric: str
    op: str
    value: float

    @classmethod
    def parse(cls, text: str, known: tuple[str, ...] = ("accuracy", "exact_match")) -> Condition:
        match = _CONDITION.match(text)
        if match is None:
            raise ValueError(
                f"cannot read the condition {text!r}: write METRIC OP NUMBER, e.g. 'accuracy>=0.9' "
                f"(metrics: {', '.join(known)}; operators: {', '.join(_OPERATORS)})"
            )
        metric, op, value = match.groups()
        if metric not in known:
            raise ValueError(f"unknown metric {metric!r} in {text!r}: use one of {', '.join(known)}")
        return cls(metric, op, float(value))

    def holds(self, figures: Mapping[str, float]) -> bool:
        if self.metric not in figures:
            raise ValueError(f"no {self.metric} figure to check (this data has only {', '.join(figures)})")
        return _OPERATORS[self.op](figures[self.metric], self.value)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


@dataclass(frozen=True)
class Published:
    name: str
    version: int
    where: str  # the target, as given

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class Target(Protocol):
    """Where a module is published."""

    description: str

    def check_base(self, name: str, fingerprint: str) -> None:
        """Raise BaseModelMismatch when `name` trained on `fingerprint` would not serve there."""

    def publish(
        self, module_dir: Path, name: str, *, description: str, metadata: Mapping[str, Any], alias: str | None
    ) -> Published: ...

    def set_alias(self, name: str, alias: str, version: int) -> None: ...

    def close(self) -> None: ...


_ADDRESS = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):\d{1,5}$")


def open_target(
    where: str, *, token: str | None = None, tls: Mapping[str, Any] | None = None, model: Any = None
) -> Target:
    """A server for "host:port", an object-store registry for "s3://bucket/prefix", else a registry
    directory (created if missing).

    `tls` holds Client's TLS options for a server (tls_ca=, tls_cert=, tls_key=, ...). `model` (the
    loaded base model) is needed for a directory, to validate the module against it.
    """
    if _ADDRESS.match(where) and not Path(where).exists():
        return ServerTarget(where, token=token, tls=tls)
    if token is not None:
        raise PublishError(
            f"an admin token only applies to a server (host:port), not to the registry {where}"
        )
    if tls:
        raise PublishError(f"TLS options only apply to a server (host:port), not to the registry {where}")
    if model is None:
        raise PublishError("publishing to a registry needs the base model to validate the module against")
    return RegistryTarget(where, model)


class RegistryTarget:
    """A registry as the server's --registry names it: a directory, or s3://bucket/prefix.

    For s3://, boto3 finds the credentials (AWS_* variables, profile, role) and the endpoint of an
    S3-compatible store comes from $PLUGBOARD_REGISTRY_ENDPOINT_URL (or $AWS_ENDPOINT_URL).
    """

    def __init__(self, where: str | Path, model: Any) -> None:
        from plugboard_server.adapters.shape import model_shape
        from plugboard_server.errors import PlugboardError
        from plugboard_server.models.gguf import default_cache_dir
        from plugboard_server.registry.open import is_object_store, open_store

        root = str(where)
        self.description = f"registry {root}" if is_object_store(root) else f"registry directory {root}"
        if not is_object_store(root) and Path(root).exists() and not Path(root).is_dir():
            raise PublishError(f"{root} is not a directory")
        try:
            self._store = open_store(
                root,
                cache_root=default_cache_dir() / "registry",
                endpoint_url=os.environ.get("PLUGBOARD_REGISTRY_ENDPOINT_URL", ""),
            )
        except (OSError, ValueError, PlugboardError) as e:
            raise PublishError(f"cannot open the registry at {root}: {e}") from None
        self._shape = model_shape(model)

    def check_base(self, name: str, fingerprint: str) -> None:
        from plugboard_server.errors import AdapterNotFound

        try:
            latest = self._store.get(name)
        except AdapterNotFound:
            return
        if latest.facts.base_model != fingerprint:
            raise BaseModelMismatch(
                f"{latest.key} in {self.description} was trained on base model "
                f"{latest.facts.base_model}, this run trains on {fingerprint}: a server runs one base "
                "model, so publish under another name"
            )

    def publish(
        self, module_dir: Path, name: str, *, description: str, metadata: Mapping[str, Any], alias: str | None
    ) -> Published:
        from plugboard_server.adapters.formats import read_spec
        from plugboard_server.adapters.types import AdapterLimits
        from plugboard_server.errors import PlugboardError
        from plugboard_server.registry.store import ModuleFacts

        fingerprint = metadata["base_model"]["fingerprint"]
        try:
            # The server's own validation; its limits (rank, virtual tokens) are checked when it loads.
            spec = read_spec(
                module_dir, self._shape, AdapterLimits(max_lora_rank=1 << 16, max_prefix_tokens=1 << 16)
            )
            mv = self._store.publish(
                name,
                module_dir,
                ModuleFacts.from_spec(spec, fingerprint),
                description=description,
                metadata=metadata,
                alias=alias,
            )
        except (PlugboardError, OSError) as e:
            raise PublishError(f"cannot publish {name} to {self.description}: {e}") from None
        return Published(mv.name, mv.version, self.description)

    def set_alias(self, name: str, alias: str, version: int) -> None:
        self._store.set_alias(name, alias, version)

    def close(self) -> None:
        self._store.close()


class ServerTarget:
    """A running plugboard server: RegisterAdapter with the admin token."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        tls: Mapping[str, Any] | None = None,
        timeout: float = 30.0,
    ) -> None:
        from plugboard_client import Client

        self.description = f"server {address}"
        self.address = address
        try:
            self.client = Client(address, token=token, timeout=timeout, **(tls or {}))
        except ValueError as e:  # an unreadable TLS file, a certificate without its key
            raise PublishError(f"cannot connect to the {self.description}: {e}") from None

    def fingerprint(self) -> str:
        from plugboard_client.errors import PlugboardError as ClientError

        try:
            return self.client.model_info().fingerprint
        except ClientError as e:
            raise PublishError(f"cannot reach the {self.description}: {e}") from None

    def check_base(self, name: str, fingerprint: str) -> None:
        served = self.fingerprint()
        if served != fingerprint:
            raise BaseModelMismatch(
                f"the {self.description} serves base model {served}, this run trains on "
                f"{fingerprint}: train with the server's --model (`plugboard info` shows it), "
                "or publish to a server that runs this base model"
            )

    def publish(
        self, module_dir: Path, name: str, *, description: str, metadata: Mapping[str, Any], alias: str | None
    ) -> Published:
        from plugboard_client.errors import PlugboardError as ClientError

        try:
            info = self.client.register_adapter(
                module_dir,
                name=name,
                description=description,
                metadata=metadata,
                alias=alias or "",
                timeout=600,
            )
        except (ClientError, ValueError, OSError) as e:
            raise PublishError(f"cannot publish {name} to the {self.description}: {e}") from None
        return Published(info.name, info.version, self.description)

    def set_alias(self, name: str, alias: str, version: int) -> None:
        self.client.set_alias(name, alias, version)

    def close(self) -> None:
        self.client.close()
