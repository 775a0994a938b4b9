"""The running batch's tensor state: a left-padded KV cache, its mask, and each row's next position.

Like TGI's CausalLMBatch: rows are left-padded so that every row's newest token sits in the last
column; `filter` drops finished rows (and the padding columns no remaining row needs) and
`concatenate` merges a freshly prefilled batch into the running one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def make_cache(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache holding the given per-layer (keys, values) [B, H_kv, T, D] without copying them."""
    cache = DynamicCache()
    for keys, values in layers:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


def cache_layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


@dataclass
class Batch:
    rows: list[Any]  # the engine's per-row state, aligned with dimension 0 of every tensor below
    cache: DynamicCache  # per layer: keys, values [B, H_kv, T, D]
    attention_mask: torch.Tensor  # [B, T] 1 where the cache holds a real token, 0 for left padding
    positions: torch.Tensor  # [B] position id of each row's next input token
    next_ids: torch.Tensor  # [B] each row's next input token (sampled, not yet in the cache)
    lora_slots: torch.Tensor  # [B] each row's LoRA slot, 0 = none
    lora_ranks: torch.Tensor  # [B] the rank of each row's LoRA, 0 = none

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def cache_len(self) -> int:
        return int(self.attention_mask.shape[1])

    def filter(self, keep: list[int]) -> None:
        """Keep only the rows at `keep` (in that order), trimming padding no kept row needs."""
        if keep == list(range(len(self.rows))):
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.attention_mask.device)
        mask = self.attention_mask.index_select(0, idx)
        # Drop the leading columns that are padding in every kept row. (A row with a prefix has a
        # masked gap between its prefix and its prompt, so count from each row's first real column.)
        start = int(mask.argmax(dim=1).min())
        self.attention_mask = mask[:, start:]
        self.cache = make_cache(
            [
                (k.index_select(0, idx)[:, :, start:], v.index_select(0, idx)[:, :, start:])
                for k, v in cache_layers(self.cache)
            ]
        )
        self.positions = self.positions.index_select(0, idx)
        self.next_ids = self.next_ids.index_select(0, idx)
        self.lora_slots = self.lora_slots.index_select(0, idx)
        self.lora_ranks = self.lora_ranks.index_select(0, idx)
        self.rows = [self.rows[i] for i in keep]

    @classmethod
    def concatenate(cls, batches: list[Batch]) -> Batch:
        """Stack batches row-wise, left-padding the shorter caches."""
        batches = [b for b in batches if len(b)]
        if len(batches) == 1:
            return batches[0]
        width = max(b.cache_len for b in batches)
        masks, per_layer = [], [[] for _ in batches[0].cache.layers]
        for b in batches:
            pad = width - b.cache_len
            masks.append(torch.nn.functional.pad(b.attention_mask, (pad, 0)))
            for i, (k, v) in enumerate(cache_layers(b.cache)):
                # F.pad on dim -2 of [B, H, T, D]: (0, 0) for D, then (pad, 0) for T.
                per_layer[i].append(
                    (torch.nn.functional.pad(k, (0, 0, pad, 0)), torch.nn.functional.pad(v, (0, 0, pad, 0)))
                )
        cache = make_cache(
            [(torch.cat([k for k, _ in kvs]), torch.cat([v for _, v in kvs])) for kvs in per_layer]
        )
        return cls(
            rows=[r for b in batches for r in b.rows],
            cache=cache,
            attention_mask=torch.cat(masks),
            positions=torch.cat([b.positions for b in batches]),
            next_ids=torch.cat([b.next_ids for b in batches]),
            lora_slots=torch.cat([b.lora_slots for b in batches]),
            lora_ranks=torch.cat([b.lora_ranks for b in batches]),
        )
