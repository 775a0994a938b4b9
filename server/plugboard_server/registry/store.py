"""The registry interface the server reads modules through, and how requests name a module.

A request names a module as "name" (the latest version), "name@7" (version 7) or "name@alias".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from plugboard_server.errors import AdapterNotFound, InvalidRequest

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
LATEST = "latest"


@dataclass(frozen=True)
class AdapterRef:
    """One immutable version of a module, and where its PEFT files are."""

    name: str
    version: int
    path: Path

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"


def parse_ref(ref: str) -> tuple[str, str]:
    """'name', 'name@7' or 'name@alias' -> (name, selector); the selector of a bare name is 'latest'."""
    name, _, selector = ref.partition("@")
    if not NAME_PATTERN.match(name):
        raise InvalidRequest(
            f"{ref!r} is not a module name: letters, digits, '.', '_' and '-', 1 to 128 characters",
            field="adapter",
        )
    if "@" in ref and not NAME_PATTERN.match(selector):
        raise InvalidRequest(
            f"{ref!r}: the version or alias after '@' is empty or malformed", field="adapter"
        )
    return name, selector or LATEST


class AdapterStore(Protocol):
    """Read access to modules. The registry issue adds publishing, aliases and deletion."""

    def resolve(self, ref: str) -> AdapterRef:
        """The version `ref` names; raises AdapterNotFound (or InvalidRequest for a malformed ref)."""
        ...

    def list(self) -> list[AdapterRef]:
        """Every servable version."""
        ...


def not_found(ref: str, known: list[str]) -> AdapterNotFound:
    hint = f"; known modules: {', '.join(sorted(known)[:10])}" if known else "; no modules are registered"
    return AdapterNotFound(f"no module {ref!r}{hint}")
