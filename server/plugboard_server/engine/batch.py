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

from plugboard_server.engine import kvcache


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
        self.cache = kvcache.make_cache(
            [
                (k.index_select(0, idx)[:, :, start:], v.index_select(0, idx)[:, :, start:])
                for k, v in kvcache.cache_layers(self.cache)
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
        masks = [torch.nn.functional.pad(b.attention_mask, (width - b.cache_len, 0)) for b in batches]
        cache = kvcache.concatenate([b.cache for b in batches], [b.cache_len for b in batches], width)
        return cls(
            rows=[r for b in batches for r in b.rows],
            cache=cache,
            attention_mask=torch.cat(masks),
            positions=torch.cat([b.positions for b in batches]),
            next_ids=torch.cat([b.next_ids for b in batches]),
            lora_slots=torch.cat([b.lora_slots for b in batches]),
            lora_ranks=torch.cat([b.lora_ranks for b in batches]),
        )
