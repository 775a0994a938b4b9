"""Module residency: host copies read from the store, and device slots lent to the rows that use them.

A module is read and validated once (`load`, on a worker thread, off the step path) and kept in host
memory. A request's module gets a slot when the request is admitted (`reserve`); rows sharing a
module share its slot. A slot no running row uses stays loaded until a new module needs it (LRU).
When every slot is in use, `reserve` says no and the request waits in the queue.

Threads: `reserve` runs on the event loop, `materialize` and `release` on the step thread; a lock
keeps the slot table consistent between them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from plugboard_server.adapters.formats import read_spec
from plugboard_server.adapters.lora import LoraSlots
from plugboard_server.adapters.types import AdapterLimits, AdapterWeights, ModelShape, ModuleKind
from plugboard_server.adapters.weights import read_adapter
from plugboard_server.errors import IncompatibleAdapter
from plugboard_server.registry.store import AdapterRef

log = logging.getLogger(__name__)


@dataclass
class Resident:
    """A module holding a slot."""

    key: str  # "name@version"
    weights: AdapterWeights
    slot: int
    refs: int = 0  # running rows (and score jobs) using it
    materialized: bool = False  # LoRA weights written into the slot buffers
    last_used: float = field(default_factory=time.monotonic)

    @property
    def kind(self) -> ModuleKind:
        return self.weights.kind

    @property
    def lora_slot(self) -> int:
        """The row's index into the LoRA buffers: its slot for a LoRA, 0 (no delta) otherwise."""
        return self.slot if self.kind is ModuleKind.LORA else 0

    @property
    def lora_rank(self) -> int:
        return self.weights.lora.rank if self.weights.lora is not None else 0


class AdapterManager:
    def __init__(
        self,
        model: torch.nn.Module,
        shape: ModelShape,
        *,
        max_slots: int,
        limits: AdapterLimits,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.shape = shape
        self.limits = limits
        self.max_slots = max_slots
        self._dtype, self._device = dtype, device
        self.lora = LoraSlots(model, max_slots, limits.max_lora_rank, dtype, device)
        self._lock = threading.Lock()
        self._host: dict[str, AdapterWeights] = {}
        self._resident: OrderedDict[str, Resident] = OrderedDict()  # least recently used first
        self._free = list(range(max_slots, 0, -1))  # slot 0 is "no adapter"

    # ----- host tier ---------------------------------------------------------------------------

    def load(self, ref: AdapterRef) -> AdapterWeights:
        """Read and validate a module (blocking: call it off the event loop). Cached after the first time."""
        cached = self._host.get(ref.key)
        if cached is not None:
            return cached
        start = time.perf_counter()
        try:
            weights = read_adapter(ref.path, self.shape, self.limits, dtype=self._dtype, device=self._device)
        except IncompatibleAdapter as exc:
            raise IncompatibleAdapter(f"module {ref.key}: {exc}") from exc
        self._host[ref.key] = weights
        log.info(
            "loaded module %s (%s, %d bytes) in %.3fs",
            ref.key,
            weights.kind.value,
            weights.nbytes,
            time.perf_counter() - start,
        )
        return weights

    def check(self, refs: list[AdapterRef]) -> dict[str, str]:
        """Validate modules ahead of use (config and header only, no weights); returns the refused ones."""
        refused = {}
        for ref in refs:
            try:
                read_spec(ref.path, self.shape, self.limits)
            except IncompatibleAdapter as exc:
                refused[ref.key] = str(exc)
                log.warning("module %s will be refused: %s", ref.key, exc)
        return refused

    # ----- device slots ------------------------------------------------------------------------

    def reserve(self, key: str, weights: AdapterWeights) -> Resident | None:
        """Take a reference on the module's slot (a free or idle one if it has none); None if all are busy."""
        with self._lock:
            resident = self._resident.get(key)
            if resident is None:
                slot = self._take_slot()
                if slot is None:
                    return None
                resident = Resident(key, weights, slot)
                self._resident[key] = resident
            resident.refs += 1
            resident.last_used = time.monotonic()
            self._resident.move_to_end(key)
            return resident

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        for key, resident in self._resident.items():  # least recently used first
            if resident.refs == 0:
                del self._resident[key]
                log.info("evicting module %s from slot %d", key, resident.slot)
                return resident.slot
        return None

    def materialize(self, resident: Resident) -> None:
        """Write a LoRA's weights into its slot before its first forward (step thread)."""
        if resident.materialized:
            return
        if resident.weights.lora is not None:
            self.lora.write(resident.slot, resident.weights.lora)
        resident.materialized = True

    def release(self, resident: Resident) -> None:
        with self._lock:
            resident.refs -= 1

    @property
    def resident_count(self) -> int:
        return len(self._resident)
