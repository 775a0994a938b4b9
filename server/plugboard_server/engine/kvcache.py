"""The KV cache of a running batch: per layer, a buffer with room to grow, written in place.

transformers' DynamicLayer concatenates every new token onto a freshly allocated tensor, so each
decode step copies the whole cache and, on CPU, page-faults in new memory for it (measured: 40% of a
32-row decode step on the default model). Here each layer keeps keys and values in buffers
[B, H_kv, capacity, D] with spare columns; a step writes its token into the next column, and the
model sees views of the filled part. The buffers are reallocated only when full, GROW columns at a time.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

GROW = 64  # spare columns added whenever a buffer is (re)allocated


class GrowingLayer(DynamicLayer):
    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int) -> None:
        """Adopt buffers [B, H_kv, capacity, D] whose first `length` columns hold the cache."""
        super().__init__()
        self.lazy_initialization(key_buffer, value_buffer)
        self._k, self._v = key_buffer, value_buffer
        self.length = length
        self._expose()

    @classmethod
    def copy_of(cls, keys: torch.Tensor, values: torch.Tensor, spare: int = GROW) -> GrowingLayer:
        """keys, values [B, H_kv, T, D] copied into new buffers with `spare` free columns after them."""
        batch, heads, length, dim = keys.shape
        k = keys.new_empty((batch, heads, length + spare, dim))
        v = values.new_empty((batch, heads, length + spare, dim))
        k[:, :, :length] = keys
        v[:, :, :length] = values
        return cls(k, v, length)

    def _expose(self) -> None:
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append [B, H_kv, n, D] in place; -> views of all keys and values so far."""
        n = key_states.shape[-2]
        end = self.length + n
        if end > self._k.shape[2]:
            self._k = _regrow(self._k, self.length, end + GROW)
            self._v = _regrow(self._v, self.length, end + GROW)
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


def _regrow(buffer: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
    batch, heads, _, dim = buffer.shape
    grown = buffer.new_empty((batch, heads, capacity, dim))
    grown[:, :, :length] = buffer[:, :, :length]
    return grown


def make_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], spare: int = GROW) -> DynamicCache:
    """A cache holding copies of the given per-layer (keys, values) [B, H_kv, T, D], `spare` columns free."""
    return from_layers([GrowingLayer.copy_of(k, v, spare) for k, v in layers])


def from_layers(layers: list[GrowingLayer]) -> DynamicCache:
    cache = DynamicCache()
    cache.layers.extend(layers)
    return cache


def concatenate(caches: list[DynamicCache], lengths: list[int], width: int) -> DynamicCache:
    """Stack caches row-wise into `width` columns, each right-aligned; the left padding is zeros.

    (Masked padding must still be finite: attention multiplies it by a zero weight, and 0 * NaN = NaN.)
    """
    layers = []
    for per_layer in zip(*(c.layers for c in caches), strict=True):
        rows = sum(layer.keys.shape[0] for layer in per_layer)
        _, heads, _, dim = per_layer[0].keys.shape
        k = per_layer[0].keys.new_zeros((rows, heads, width + GROW, dim))
        v = per_layer[0].values.new_zeros((rows, heads, width + GROW, dim))
        row = 0
        for layer, length in zip(per_layer, lengths, strict=True):
            n = layer.keys.shape[0]
            k[row : row + n, :, width - length : width] = layer.keys
            v[row : row + n, :, width - length : width] = layer.values
            row += n
        layers.append(GrowingLayer(k, v, width))
    return from_layers(layers)


def empty_cache(
    batch: int, heads: int, head_dim: int, layers: int, spare: int, dtype: torch.dtype, device: torch.device
) -> DynamicCache:
    """A cache with no tokens yet and room for `spare` (a prefill's width plus room to decode)."""
    empty = torch.empty((batch, heads, 0, head_dim), dtype=dtype, device=device)
    return make_cache([(empty, empty)] * layers, spare)


def cache_layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]
