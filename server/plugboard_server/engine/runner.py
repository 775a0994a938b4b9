"""One forward of the frozen model: prefill a new batch, decode one token for a running batch, or score."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from plugboard_server.engine.batch import Batch
from plugboard_server.models.loading import LoadedModel


class ModelRunner:
    def __init__(self, loaded: LoadedModel) -> None:
        self.model = loaded.model
        self.device = loaded.device
        self.pad_id = int(loaded.tokenizer.pad_token_id or 0)

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> input ids [B, L] and mask [B, L], each row right-aligned."""
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
        return ids.to(self.device), mask.to(self.device)

    @staticmethod
    def _positions(mask: torch.Tensor) -> torch.Tensor:
        # Positions count real tokens only, as transformers' generate does for left-padded rows.
        return (mask.cumsum(dim=1) - 1).clamp(min=0)

    @torch.inference_mode()
    def prefill(self, sequences: list[list[int]], rows: list[Any]) -> tuple[Batch, torch.Tensor]:
        """Run the prompts through the model -> (a batch holding their cache, last logits [B, V])."""
        ids, mask = self._left_pad(sequences)
        cache = DynamicCache()
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=self._positions(mask),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        batch = Batch(
            rows=rows,
            cache=out.past_key_values,
            attention_mask=mask,
            positions=mask.sum(dim=1),
            next_ids=torch.zeros(len(rows), dtype=torch.long, device=self.device),
        )
        return batch, out.logits[:, -1, :]

    @torch.inference_mode()
    def decode(self, batch: Batch) -> torch.Tensor:
        """Feed each row's next token; the cache grows by one column. -> logits [B, V]."""
        ones = torch.ones((len(batch), 1), dtype=batch.attention_mask.dtype, device=self.device)
        mask = torch.cat([batch.attention_mask, ones], dim=1)
        out = self.model(
            input_ids=batch.next_ids[:, None],
            attention_mask=mask,
            position_ids=batch.positions[:, None],
            past_key_values=batch.cache,
            use_cache=True,
        )
        batch.cache = out.past_key_values
        batch.attention_mask = mask
        batch.positions = batch.positions + 1
        return out.logits[:, -1, :]

    @torch.inference_mode()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        """Sum of log p(continuation | prompt) for each (prompt ids, continuation ids), in one forward."""
        ids, mask = self._left_pad([p + c for p, c in pairs])
        keep = max(len(c) for _, c in pairs) + 1  # the logits that predict any continuation token
        logits = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=self._positions(mask),
            use_cache=False,
            logits_to_keep=keep,
        ).logits.float()  # [B, keep, V]
        lse = torch.logsumexp(logits, dim=-1)  # [B, keep]
        totals = []
        for row, (_, cont) in enumerate(pairs):
            # Left padding puts the continuation at the end: token j is predicted at kept column
            # keep - len(cont) - 1 + j.
            cols = torch.arange(keep - len(cont) - 1, keep - 1, device=logits.device)
            target = torch.tensor(cont, dtype=torch.long, device=logits.device)
            totals.append(float((logits[row, cols, target] - lse[row, cols]).sum()))
        return totals
