"""Import a directory of PEFT modules (one subdirectory per module, named by it) into a registry.

Each subdirectory with an adapter_config.json becomes the next version of the module of its name,
unless that module's latest version already holds exactly the same files: importing the same
directory twice publishes nothing the second time, and changed files publish a new version.
A module that cannot be imported is logged and skipped; the others are still imported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from plugboard_server.errors import AdapterNotFound, PlugboardError
from plugboard_server.registry._files import digest
from plugboard_server.registry.store import (
    CONFIG_FILE,
    ModuleFacts,
    ModuleVersion,
    RegistryStore,
    check_name,
)

log = logging.getLogger(__name__)


def import_directory(
    store: RegistryStore, source_root: Path, facts_for: Callable[[Path], ModuleFacts]
) -> list[ModuleVersion]:
    """Publish each changed or new module under `source_root`; -> the versions published.

    `facts_for(dir)` validates a module against the base model and describes it; it raises
    IncompatibleAdapter (or another PlugboardError) for one that does not fit, which is then skipped.
    """
    source_root = Path(source_root)
    if not source_root.is_dir():
        log.warning("import: %s is not a directory; nothing imported", source_root)
        return []
    published: list[ModuleVersion] = []
    for child in sorted(source_root.iterdir()):
        if child.name.startswith(".") or not child.is_dir() or child.is_symlink():
            continue
        if not (child / CONFIG_FILE).is_file():
            log.info("import: skipping %s: no %s", child, CONFIG_FILE)
            continue
        try:
            check_name(child.name)
            mv = _import_one(store, child, facts_for)
        except (PlugboardError, OSError) as e:
            log.warning("import: skipping %s: %s", child, e)
            continue
        if mv is not None:
            published.append(mv)
    log.info("import from %s: %d versions published", source_root, len(published))
    return published


def _import_one(
    store: RegistryStore, source: Path, facts_for: Callable[[Path], ModuleFacts]
) -> ModuleVersion | None:
    name = source.name
    try:
        latest = store.get(name)
    except AdapterNotFound:
        latest = None
    if latest is not None:
        # The regular files, as publish stores them (it refuses a directory holding anything else).
        files = {p.name: digest(p)[0] for p in source.iterdir() if p.is_file() and not p.is_symlink()}
        if files == dict(latest.files):
            log.info("import: %s unchanged (same files as %s)", source, latest.key)
            return None
    mv = store.publish(name, source, facts_for(source))
    log.info("import: %s -> %s", source, mv.key)
    return mv
