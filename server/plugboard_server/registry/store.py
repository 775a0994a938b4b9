"""The registry interface, its value types, and how requests name a module.

A request names a module as "name" (its latest version), "name@7" (version 7) or "name@alias".
Versions are immutable; `latest` is an implicit alias of the highest version.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from plugboard_server.errors import AdapterNotFound, InvalidRequest, PlugboardError

if TYPE_CHECKING:  # the registry itself needs no torch
    from plugboard_server.adapters.types import AdapterSpec

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # used with fullmatch: "$" would pass "x\n"
# An alias may not be all digits, or "name@7" would be ambiguous.
ALIAS_PATTERN = re.compile(r"(?![0-9]+\Z)[a-z0-9][a-z0-9._-]{0,63}")
LATEST = "latest"
CONFIG_FILE = "adapter_config.json"


class AliasInUse(PlugboardError):
    """Deleting a version an alias points at, without force."""


@dataclass(frozen=True)
class AdapterRef:
    """One immutable version of a module, where its PEFT files are, and their expected checksums."""

    name: str
    version: int
    path: Path
    sha256: tuple[tuple[str, str], ...] = ()  # (file name, hex digest); empty: not checked

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class ModuleFacts:
    """What validation against the base model found; stored with each version."""

    kind: str  # "PREFIX", "PROMPT", "LORA"
    peft_type: str  # PREFIX_TUNING, PROMPT_TUNING, P_TUNING, LORA
    base_model: str  # the base model's fingerprint
    rank: int = 0
    num_virtual_tokens: int = 0
    target_modules: tuple[str, ...] = ()

    @classmethod
    def from_spec(cls, spec: AdapterSpec, base_model: str) -> ModuleFacts:
        """The facts of a module validated against the base model whose fingerprint is base_model."""
        return cls(
            kind=spec.kind.value,
            peft_type=spec.peft_type,
            base_model=base_model,
            rank=spec.rank,
            num_virtual_tokens=spec.num_virtual_tokens,
            target_modules=spec.target_modules,
        )


@dataclass(frozen=True)
class ModuleVersion:
    """One stored version of a module, with everything the registry knows about it."""

    name: str
    version: int
    facts: ModuleFacts
    size_bytes: int
    files: Mapping[str, str]  # file name -> sha256 hex
    created_at: float  # unix seconds
    path: Path
    description: str = ""
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)  # JSON-compatible
    aliases: tuple[str, ...] = ()  # aliases pointing here; "latest" included when it is the latest

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef(self.name, self.version, self.path, tuple(sorted(self.files.items())))


def check_name(name: str, what: str = "name") -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidRequest(
            f"{name!r} is not a valid module {what}: lowercase letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 64 characters",
            field=what,
        )
    return name


def check_alias(alias: str) -> str:
    if alias == LATEST:
        raise InvalidRequest("'latest' always means the highest version; it cannot be set", field="alias")
    if not ALIAS_PATTERN.fullmatch(alias):
        raise InvalidRequest(
            f"{alias!r} is not a valid alias: like a name, and not all digits", field="alias"
        )
    return alias


def check_publish(
    name: str, tags: tuple[str, ...], alias: str | None, metadata: Mapping[str, Any] | None
) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Check what a publish names and carries -> (tags without repeats, metadata as a dict)."""
    check_name(name)
    tags = tuple(dict.fromkeys(check_name(t, "tag") for t in tags))
    if alias is not None:
        check_alias(alias)
    try:
        out = dict(metadata or {})
        if not all(isinstance(k, str) for k in out):
            raise TypeError("its keys must be strings")
        json.dumps(out, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidRequest(f"metadata is not a JSON object: {e}", "metadata") from None
    return tags, out


def parse_ref(ref: str) -> tuple[str, str]:
    """'name', 'name@7' or 'name@alias' -> (name, selector); the selector of a bare name is 'latest'."""
    name, at, selector = ref.partition("@")
    check_name(name, "adapter")
    if at and not ((selector.isascii() and selector.isdigit()) or ALIAS_PATTERN.fullmatch(selector)):
        raise InvalidRequest(
            f"{ref!r}: the version or alias after '@' is empty or malformed", field="adapter"
        )
    return name, selector or LATEST


class AdapterStore(Protocol):
    """Read access to modules: what the Generation service needs."""

    def resolve(self, ref: str) -> AdapterRef:
        """The version `ref` names; raises AdapterNotFound (or InvalidRequest for a malformed ref)."""
        ...

    def list(self) -> list[AdapterRef]:
        """Every servable version (for the server's checks at start)."""
        ...

    def fetch(self, ref: AdapterRef) -> Path:
        """A local directory holding the version's files, checked against its checksums (blocking).

        An object store downloads the version first (then keeps it in a local cache). Raises
        AdapterNotFound for a version deleted since it was resolved, CorruptModule for files that
        differ from the checksums the registry recorded.
        """
        ...


class RegistryStore(AdapterStore, Protocol):
    """The full registry: publish, list, alias, delete. Safe across threads and processes."""

    def staging(self) -> AbstractContextManager[Path]:
        """A fresh empty directory on the registry's filesystem to assemble a version in; removed on exit."""
        ...

    def publish(
        self,
        name: str,
        source: Path,
        facts: ModuleFacts,
        *,
        description: str = "",
        tags: tuple[str, ...] = (),
        metadata: Mapping[str, Any] | None = None,
        alias: str | None = None,
    ) -> ModuleVersion:
        """Store the files in `source` (a staging dir, moved; or any dir, copied) as the next version."""
        ...

    def get(self, ref: str) -> ModuleVersion: ...

    def versions(self, name: str) -> list[ModuleVersion]: ...

    def list_versions(
        self,
        *,
        page_size: int = 100,
        page_token: str = "",
        kind: str = "",
        tag: str = "",
        name_prefix: str = "",
        all_versions: bool = False,
    ) -> tuple[list[ModuleVersion], str]:
        """One page, ordered by name then version; -> (versions, next page token or "")."""
        ...

    def set_alias(self, name: str, alias: str, version: int) -> ModuleVersion: ...

    def delete(self, name: str, version: int | None = None, *, force: bool = False) -> list[str]:
        """Delete one version, or every version of `name`; -> the deleted "name@version" keys."""
        ...

    def count(self) -> tuple[int, int]:
        """(modules, versions) in the registry."""
        ...


def not_found(ref: str, known: list[str] | None = None) -> AdapterNotFound:
    if known is None:
        return AdapterNotFound(f"no module {ref!r}")
    hint = f"; known modules: {', '.join(sorted(known)[:10])}" if known else "; no modules are registered"
    return AdapterNotFound(f"no module {ref!r}{hint}")


def no_such_version(ref: str, name: str, selector: str, latest: int | None) -> AdapterNotFound:
    """NOT_FOUND for `ref`: no module at all, or (when it has a `latest`) no such version or alias."""
    if latest is None:
        return not_found(ref)
    return AdapterNotFound(
        f"module {name!r} has no version or alias {selector!r} (its latest is {name}@{latest})"
    )
