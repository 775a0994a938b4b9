"""Module residency in two tiers above the registry's disk: host memory and device slots.

- disk -> host (`load`): read, checksum and validate a version once, off the event loop and off the
  step thread; kept in a host LRU of --max-host-adapters versions.
- host -> device (`reserve`): an admitted request's module gets a slot; rows sharing a module share
  it. A slot nobody uses stays loaded until a new module needs it (LRU); pinned modules (LoadAdapter)
  are never evicted. When every slot is busy or pinned, `reserve` says no and the request waits.
- A module unloaded or deleted while rows use it keeps its slot until the last of them finishes.

Threads: `load` runs on worker threads, `reserve` on the event loop, `materialize` and `release`
on the step thread; one lock keeps the tables consistent. Like vLLM's two-level LRU manager.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from plugboard_server.adapters.formats import read_spec
from plugboard_server.adapters.lora import LoraSlots, unwrap
from plugboard_server.adapters.types import AdapterLimits, AdapterSpec, AdapterWeights, ModelShape, ModuleKind
from plugboard_server.adapters.weights import read_adapter
from plugboard_server.errors import AdapterNotFound, CorruptModule, IncompatibleAdapter, Overloaded
from plugboard_server.metrics import Metrics
from plugboard_server.registry.local import deleted, fetch_local
from plugboard_server.registry.store import AdapterRef

log = logging.getLogger(__name__)


@dataclass
class Resident:
    """A module holding a device slot."""

    key: str  # "name@version"
    weights: AdapterWeights
    slot: int
    refs: int = 0  # running rows (and score jobs) using it
    pinned: bool = False
    materialized: bool = False  # LoRA weights written into the slot buffers
    doomed: bool = False  # unloaded while in use: the slot frees when refs reach 0
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
        max_host: int = 128,
        limits: AdapterLimits,
        dtype: torch.dtype,
        device: torch.device,
        metrics: Metrics | None = None,
        fetch: Callable[[AdapterRef], Path] | None = None,
    ) -> None:
        """`fetch` is the registry's: a version's files in a local directory, checked (downloaded first
        from an object store); the default reads a directory registry in place."""
        self.shape = shape
        self._fetch = fetch or fetch_local
        self.limits = limits
        self.max_slots = max_slots
        self.max_host = max_host
        self.metrics = metrics or Metrics()
        self._dtype, self._device = dtype, device
        self.lora = LoraSlots(model, max_slots, limits.max_lora_rank, dtype, device)
        self._lock = threading.Lock()
        self._host: OrderedDict[str, AdapterWeights] = OrderedDict()  # least recently used first
        self._slots: OrderedDict[str, Resident] = OrderedDict()
        self._draining: set[int] = set()  # slots of unloaded modules that rows still use: free soon
        self._free = list(range(max_slots, 0, -1))  # slot 0 is "no adapter"

    # ----- disk -> host ------------------------------------------------------------------------

    def validate(self, path: Path) -> AdapterSpec:
        """Check a module directory against the base model (config and header only)."""
        return read_spec(path, self.shape, self.limits)

    def load(self, ref: AdapterRef) -> AdapterWeights:
        """The module's weights in host memory, read from disk the first time (blocking: off the loop)."""
        with self._lock:
            cached = self._host.get(ref.key)
            if cached is not None:
                self._host.move_to_end(ref.key)
        if cached is not None:
            self.metrics.adapter_cache.labels("host", "hit").inc()
            return cached
        self.metrics.adapter_cache.labels("host", "miss").inc()
        start = time.perf_counter()
        try:
            weights = self._read(ref)
        except AdapterNotFound:
            self.metrics.adapter_loads.labels("disk", "deleted").inc()
            raise
        except CorruptModule as exc:
            # Its own outcome: an operator alerts on this one (the disk changed under the registry).
            self.metrics.adapter_loads.labels("disk", "corrupt").inc()
            log.error("refusing module %s: %s", ref.key, exc)
            raise CorruptModule(f"module {ref.key}: {exc}") from exc
        except IncompatibleAdapter as exc:
            self.metrics.adapter_loads.labels("disk", "error").inc()
            raise IncompatibleAdapter(f"module {ref.key}: {exc}") from exc
        except OSError:
            self.metrics.adapter_loads.labels("disk", "error").inc()
            raise
        elapsed = time.perf_counter() - start
        self.metrics.adapter_loads.labels("disk", "ok").inc()
        self.metrics.adapter_load_seconds.labels("disk").observe(elapsed)
        with self._lock:
            self._host[ref.key] = weights
            self._host.move_to_end(ref.key)
            while len(self._host) > self.max_host:
                evicted, _ = self._host.popitem(last=False)
                self.metrics.adapter_evictions.labels("host").inc()
                self.metrics.adapter_resident.remove_if_present(evicted, "host")
            self.metrics.adapter_resident.set_resident(ref.key, "host")
            self._update_gauges()
        log.info(
            "loaded module %s (%s, %d bytes) in %.3fs", ref.key, weights.kind.value, weights.nbytes, elapsed
        )
        return weights

    def _read(self, ref: AdapterRef) -> AdapterWeights:
        """Check the files against the registry's checksums, then read them.

        A version deleted after the request resolved it (its row gone from the index, its files
        going) is AdapterNotFound, not a broken module: whichever read first found a file missing.
        """
        try:
            path = self._fetch(ref)  # AdapterNotFound, or CorruptModule for a missing or changed file
            return read_adapter(path, self.shape, self.limits, dtype=self._dtype, device=self._device)
        except (IncompatibleAdapter, OSError):
            if ref.sha256 and deleted(ref):
                raise AdapterNotFound(f"module {ref.key} was deleted") from None
            raise

    # ----- host -> device ----------------------------------------------------------------------

    def reserve(self, key: str, weights: AdapterWeights, *, pin: bool = False) -> Resident | None:
        """Take a reference on the module's slot (a free or idle one if it has none); None if all are busy."""
        with self._lock:
            resident = self._slots.get(key)
            if resident is None:
                slot = self._take_slot()
                if slot is None:
                    self.metrics.adapter_cache.labels("device", "miss").inc()
                    return None
                resident = Resident(key, weights, slot)
                self._slots[key] = resident
                self.metrics.adapter_cache.labels("device", "miss").inc()
                self.metrics.adapter_resident.set_resident(key, "device")
                self._update_gauges()
            else:
                self.metrics.adapter_cache.labels("device", "hit").inc()
            if pin:
                resident.pinned = True
            else:
                resident.refs += 1
            resident.last_used = time.monotonic()
            self._slots.move_to_end(key)
            return resident

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        for key, resident in self._slots.items():  # least recently used first
            if resident.refs == 0 and not resident.pinned:
                del self._slots[key]
                self.metrics.adapter_evictions.labels("device").inc()
                self.metrics.adapter_resident.remove_if_present(key, "device")
                log.info("evicting module %s from slot %d", key, resident.slot)
                return resident.slot
        return None

    def materialize(self, resident: Resident) -> None:
        """Write a LoRA's weights into its slot before its first forward (step thread)."""
        if resident.materialized:
            return
        start = time.perf_counter()
        if resident.weights.lora is not None:
            self.lora.write(resident.slot, resident.weights.lora)
        resident.materialized = True
        self.metrics.adapter_loads.labels("host", "ok").inc()
        self.metrics.adapter_load_seconds.labels("host").observe(time.perf_counter() - start)

    def release(self, resident: Resident) -> None:
        with self._lock:
            resident.refs -= 1
            if resident.doomed and resident.refs == 0:
                self._draining.discard(resident.slot)
                self._free.append(resident.slot)

    def pin(self, ref: AdapterRef) -> Resident:
        """LoadAdapter: bring the module to a device slot and keep it there (blocking: off the loop)."""
        weights = self.load(ref)
        resident = self.reserve(ref.key, weights, pin=True)
        if resident is None:
            raise Overloaded(
                f"every one of the {self.max_slots} device slots is in use or pinned; unload one first"
            )
        return resident

    def unload(self, key: str) -> None:
        """UnloadAdapter / delete: unpin and evict from both tiers; rows using it finish first."""
        with self._lock:
            if self._host.pop(key, None) is not None:
                self.metrics.adapter_evictions.labels("host").inc()
                self.metrics.adapter_resident.remove_if_present(key, "host")
            resident = self._slots.pop(key, None)
            if resident is not None:
                resident.pinned = False
                self.metrics.adapter_evictions.labels("device").inc()
                self.metrics.adapter_resident.remove_if_present(key, "device")
                if resident.refs == 0:
                    self._free.append(resident.slot)
                else:
                    resident.doomed = True
                    self._draining.add(resident.slot)
            self._update_gauges()

    def close(self) -> None:
        """The engine stopped: give the model its plain layers back (it may serve another engine)."""
        with self._lock:
            unwrap(self.lora.model)
            self.lora.layers.clear()

    def check_servable(self, key: str) -> None:
        """Overloaded when `key` could never get a slot: every slot is pinned by other modules (a
        request would wait for an UnloadAdapter that may never come)."""
        with self._lock:
            if (
                key in self._slots
                or self._free
                or self._draining
                or not all(r.pinned for r in self._slots.values())
            ):
                return
        raise Overloaded(
            f"every one of the {self.max_slots} device slots is pinned by LoadAdapter; "
            "unload a module or raise --max-loaded-adapters",
            retry_after=5.0,
        )

    # ----- reporting ---------------------------------------------------------------------------

    def residency(self, key: str) -> tuple[str, bool]:
        """("DEVICE" | "HOST" | "DISK", pinned)."""
        with self._lock:
            resident = self._slots.get(key)
            if resident is not None:
                return "DEVICE", resident.pinned
            return ("HOST" if key in self._host else "DISK"), False

    def slot_map(self) -> dict[str, tuple[int, int, bool]]:
        """key -> (slot, refs, pinned) of every module holding a slot, least recently used first."""
        with self._lock:
            return {k: (r.slot, r.refs, r.pinned) for k, r in self._slots.items()}

    def host_keys(self) -> list[str]:
        with self._lock:
            return list(self._host)

    @property
    def resident_count(self) -> int:
        return len(self._slots)

    def _update_gauges(self) -> None:
        self.metrics.adapters_resident.labels("device").set(len(self._slots))
        self.metrics.adapters_resident.labels("host").set(len(self._host))
