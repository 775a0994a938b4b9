"""Multi-LoRA: every row of a batch gets its own adapter's low-rank delta, in one set of tensor ops.

Each targeted base linear is wrapped once. The wrapper holds preallocated slot buffers
A [slots + 1, in, R] and B [slots + 1, R, out] (R = --max-lora-rank; smaller ranks are zero-padded,
scaling is folded into B; slot 0 stays zero = no adapter). For the rows that use an adapter it
computes y = base(x) + (x @ A[slot]) @ B[slot] with a gather and two batched matmuls: no Python loop
over adapters in the forward. Buffers are sliced to the largest rank in the batch, so a batch of
rank-8 adapters does rank-8 work even when R is 64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from plugboard_server.adapters.shape import linear_in_out
from plugboard_server.adapters.types import LoraWeights


@dataclass
class LoraBatch:
    """Which rows of the current forward use which slot. Set by the runner before every forward."""

    rows: torch.Tensor | None = None  # [n] batch rows that use an adapter; None: no row does
    slots: torch.Tensor | None = None  # [n] their slots
    all_rows: bool = False  # every row uses one: skip the row gather / scatter
    rank: int = 0  # the largest rank among the batch's adapters
    # Bumped whenever the rows' slots (or a slot's weights) change: the layers keep the weights they
    # gathered for the current rows until then, so decode steps of an unchanged batch gather nothing.
    version: int = 0
    _key: torch.Tensor | None = None

    def set(self, slots: torch.Tensor, rank: int) -> None:
        """slots [B]: each row's slot, 0 = none; rank: the largest rank among the rows' adapters."""
        if self._key is not None and self._key.shape == slots.shape and torch.equal(self._key, slots):
            return
        self._key = slots.clone()
        self.version += 1
        used = slots != 0
        n = int(used.sum())
        if n == 0:
            self.rows = self.slots = None
            return
        self.all_rows = n == slots.numel()
        self.rows = None if self.all_rows else used.nonzero().squeeze(1)
        self.slots = slots if self.all_rows else slots[self.rows]
        self.rank = rank

    def invalidate(self) -> None:
        """A slot's weights changed: gather again at the next forward."""
        self._key = None
        self.version += 1

    def clear(self) -> None:
        self.rows = self.slots = None


class MultiLoraLinear(nn.Module):
    """A base linear (or GPT-2 Conv1D) plus per-row LoRA deltas from slot buffers."""

    def __init__(
        self,
        base: nn.Module,
        batch: LoraBatch,
        slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        dims = linear_in_out(base)
        assert dims is not None, f"not a linear layer: {type(base).__name__}"
        self.base = base
        self.in_features, self.out_features = dims
        self._batch = batch
        # Buffers, not parameters: they never train and must not appear in state dicts.
        self.register_buffer(
            "lora_a",
            torch.zeros(slots + 1, self.in_features, max_rank, dtype=dtype, device=device),
            persistent=False,
        )
        self.register_buffer(
            "lora_b",
            torch.zeros(slots + 1, max_rank, self.out_features, dtype=dtype, device=device),
            persistent=False,
        )
        self.used_slots: set[int] = set()  # slots holding a non-zero delta for this layer
        # (LoraBatch.version, A [n, in, r], B [n, r, out]) gathered for the current rows
        self._gathered: tuple[int, torch.Tensor, torch.Tensor] | None = None

    @property
    def weight(self) -> torch.Tensor:  # code that inspects q_proj.weight (dtype, device) still works
        return self.base.weight

    def write(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Put A [r, in] and scaled B [out, r] into `slot` (None: the adapter leaves this layer alone)."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if a is None or b is None:
            self.used_slots.discard(slot)
            return
        r = a.shape[0]
        self.lora_a[slot, :, :r] = a.t()
        self.lora_b[slot, :r, :] = b.t()
        self.used_slots.add(slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self._batch
        if batch.slots is None or not self.used_slots:
            return y
        if self._gathered is None or self._gathered[0] != batch.version:
            r = batch.rank
            a = self.lora_a[:, :, :r].index_select(0, batch.slots)  # [n, in, r]
            b = self.lora_b[:, :r, :].index_select(0, batch.slots)  # [n, r, out]
            self._gathered = (batch.version, a, b)
        _, a, b = self._gathered
        xs = x if batch.all_rows else x.index_select(0, batch.rows)  # [n, T, in]
        delta = torch.bmm(torch.bmm(xs.to(a.dtype), a), b).to(y.dtype)  # [n, T, out]
        if batch.all_rows:
            return y.add_(delta)
        return y.index_add_(0, batch.rows, delta)


class LoraSlots:
    """The wrapped layers of one model, by module path; wraps a layer the first time an adapter needs it."""

    def __init__(self, model: nn.Module, slots: int, max_rank: int, dtype: torch.dtype, device: torch.device):
        unwrap(model)  # wrappers an earlier engine left would add its last batch's deltas
        self.model = model
        self.batch = LoraBatch()
        self._slots, self._max_rank = slots, max_rank
        self._dtype, self._device = dtype, device
        self.layers: dict[str, MultiLoraLinear] = {}

    def _wrap(self, path: str) -> MultiLoraLinear:
        parent_path, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        base = getattr(parent, child)
        wrapper = MultiLoraLinear(base, self.batch, self._slots, self._max_rank, self._dtype, self._device)
        setattr(parent, child, wrapper)
        self.layers[path] = wrapper
        return wrapper

    def write(self, slot: int, lora: LoraWeights) -> None:
        """Load an adapter into `slot` of every layer: its own layers get its weights, the others zeros."""
        for path in lora.layers.keys() - self.layers.keys():
            self._wrap(path)
        for path, layer in self.layers.items():
            w = lora.layers.get(path)
            layer.write(slot, w.a if w else None, w.b if w else None)
        self.batch.invalidate()


def unwrap(model: nn.Module) -> None:
    """Put the base layers back where LoraSlots wrapped them (an engine stopping, or a new one starting)."""
    wrapped = [name for name, m in model.named_modules() if isinstance(m, MultiLoraLinear)]
    for path in wrapped:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, getattr(parent, child).base)
