"""A module's index object in S3Store: its versions, their facts and checksums, its aliases.

One small JSON object per module, `<prefix>index/<name>.json`, replaced whole by a conditional PUT
(If-Match its ETag): the index is the manifest, written after the version's files are uploaded, so
a reader never sees a version whose files are not all there, and two publishers can never both
take the same version number (one of them gets 412 and tries again with the next).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plugboard_server.errors import StorageError
from plugboard_server.registry.store import LATEST, ModuleFacts, ModuleVersion

FORMAT = 1


@dataclass
class ModuleIndex:
    """Everything the registry knows about one module; `versions` maps a version to its record."""

    name: str
    next_version: int = 1  # only grows: a deleted version's number is never handed out again
    versions: dict[int, dict[str, Any]] = field(default_factory=dict)
    aliases: dict[str, int] = field(default_factory=dict)

    def copy(self) -> ModuleIndex:
        return copy.deepcopy(self)

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "name": self.name,
            "next_version": self.next_version,
            "versions": {str(v): r for v, r in sorted(self.versions.items())},
            "aliases": dict(sorted(self.aliases.items())),
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, key: str) -> ModuleIndex:
        try:
            doc = json.loads(data)
            if doc.get("format") != FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, this server reads format {FORMAT}")
            return cls(
                name=str(doc["name"]),
                next_version=int(doc["next_version"]),
                versions={int(v): dict(r) for v, r in doc["versions"].items()},
                aliases={str(a): int(v) for a, v in doc["aliases"].items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise StorageError(f"the registry's index object {key} is unreadable: {e}") from None

    def latest(self) -> int | None:
        return max(self.versions, default=None)

    def select(self, selector: str) -> int | None:
        """The version `selector` ("latest", "7" or an alias) names, if it exists."""
        if selector == LATEST:
            return self.latest()
        if selector.isascii() and selector.isdigit():
            version = int(selector)
            return version if version in self.versions else None
        version = self.aliases.get(selector)
        return version if version in self.versions else None

    def aliases_of(self, version: int) -> tuple[str, ...]:
        found = sorted(a for a, v in self.aliases.items() if v == version)
        if version == self.latest():
            found.append(LATEST)
        return tuple(found)

    def module_version(self, version: int, cache_root: Path) -> ModuleVersion:
        """The stored version as the registry interface shows it; its path is where fetch puts its files."""
        r = self.versions[version]
        return ModuleVersion(
            name=self.name,
            version=version,
            facts=ModuleFacts(
                kind=r["kind"],
                peft_type=r["peft_type"],
                base_model=r["base_model"],
                rank=r["rank"],
                num_virtual_tokens=r["num_virtual_tokens"],
                target_modules=tuple(r["target_modules"]),
            ),
            size_bytes=r["size_bytes"],
            files=dict(r["files"]),
            created_at=r["created_at"],
            path=cache_root / self.name / str(version),
            description=r["description"],
            tags=tuple(r["tags"]),
            metadata=dict(r["metadata"]),
            aliases=self.aliases_of(version),
        )


def version_record(
    facts: ModuleFacts,
    files: dict[str, str],
    sizes: dict[str, int],
    objects: str,
    *,
    description: str,
    tags: tuple[str, ...],
    metadata: dict[str, Any],
) -> dict[str, Any]:
    """What the index stores of a new version; `objects` is the key prefix its files were uploaded under."""
    return {
        "kind": facts.kind,
        "peft_type": facts.peft_type,
        "base_model": facts.base_model,
        "rank": facts.rank,
        "num_virtual_tokens": facts.num_virtual_tokens,
        "target_modules": list(facts.target_modules),
        "size_bytes": sum(sizes.values()),
        "files": dict(sorted(files.items())),
        "sizes": dict(sorted(sizes.items())),
        "created_at": time.time(),
        "description": description,
        "tags": list(tags),
        "metadata": dict(metadata),
        "objects": objects,
    }
