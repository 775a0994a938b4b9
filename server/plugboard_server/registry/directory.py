"""A read-only store over a directory of PEFT modules: one subdirectory per module, named by it.

`plugboard-server --adapters-dir DIR` serves DIR/<name>/{adapter_config.json, *.safetensors} as
version 1 of module <name>. The real registry (versions, aliases, publishing) replaces it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from plugboard_server.errors import AdapterNotFound
from plugboard_server.registry.store import LATEST, NAME_PATTERN, AdapterRef, not_found, parse_ref

log = logging.getLogger(__name__)


class DirectoryStore:
    def __init__(self, root: Path | None) -> None:
        self.root = root  # None: no modules
        self._modules = self._scan()

    def _scan(self) -> dict[str, AdapterRef]:
        modules: dict[str, AdapterRef] = {}
        if self.root is None:
            return modules
        if not self.root.is_dir():
            log.warning("adapters directory %s does not exist: no modules", self.root)
            return modules
        for child in sorted(self.root.iterdir()):
            if not child.is_dir() or child.name.startswith("."):
                continue
            if not NAME_PATTERN.match(child.name):
                log.warning("skipping %s: not a valid module name", child)
                continue
            if not (child / "adapter_config.json").is_file():
                log.warning("skipping %s: no adapter_config.json", child)
                continue
            modules[child.name] = AdapterRef(child.name, 1, child)
        log.info("adapters directory %s: %d modules", self.root, len(modules))
        return modules

    def resolve(self, ref: str) -> AdapterRef:
        name, selector = parse_ref(ref)
        module = self._modules.get(name)
        if module is None:
            raise not_found(ref, list(self._modules))
        if selector not in (LATEST, str(module.version)):
            raise AdapterNotFound(f"module {name!r} has no version or alias {selector!r} (it has version 1)")
        return module

    def list(self) -> list[AdapterRef]:
        return list(self._modules.values())
