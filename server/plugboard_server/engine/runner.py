"""One forward of the frozen model: prefill new rows, decode one token for a running batch, or score.

Every row may carry a module (adapters/manager.Resident), applied as PEFT applies it:
- prefix: its per-layer key/value prefix goes into the row's KV cache before the prompt, right-aligned
  under left padding; the padding between a short prefix and a short prompt is masked;
- soft prompt: its virtual-token embeddings stand before the prompt's embeddings, as input tokens;
- LoRA: the row's slot is handed to the multi-LoRA layers for this forward.
Positions count a row's real tokens (prefix and virtual tokens included), as PEFT's generate does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from plugboard_server.adapters.lora import LoraBatch
from plugboard_server.adapters.manager import Resident
from plugboard_server.engine import kvcache
from plugboard_server.engine.batch import Batch
from plugboard_server.models.loading import LoadedModel


@dataclass
class _Inputs:
    ids: torch.Tensor | None  # [B, W] token ids, or None when embeds are given
    embeds: torch.Tensor | None  # [B, W, hidden] when a row has a soft prompt
    mask: torch.Tensor  # [B, P + W]: the prefix columns, then the input columns
    positions: torch.Tensor  # [B, W]
    cache: DynamicCache  # holds the prefixes ([B, H_kv, P, D] per layer), or empty


class ModelRunner:
    def __init__(self, loaded: LoadedModel, lora: LoraBatch | None = None) -> None:
        self.model = loaded.model
        self.device = loaded.device
        self.dtype = loaded.dtype
        self._kv_shape = (loaded.num_layers, loaded.num_key_value_heads, loaded.head_dim)
        self.pad_id = int(loaded.tokenizer.pad_token_id or 0)
        self.lora = lora or LoraBatch()

    def _build(self, sequences: list[list[int]], modules: Sequence[Resident | None]) -> _Inputs:
        soft = [m.weights.prompt.embeddings if m and m.weights.prompt is not None else None for m in modules]
        lengths = [len(s) + (0 if e is None else e.shape[0]) for s, e in zip(sequences, soft, strict=True)]
        width = max(lengths)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, (s, n) in enumerate(zip(sequences, lengths, strict=True)):
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - n :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        embeds = None
        if any(e is not None for e in soft):
            embeds = self.model.get_input_embeddings()(ids)
            for i, e in enumerate(soft):
                if e is not None:  # the virtual tokens take the columns before the prompt
                    start = width - lengths[i]
                    embeds[i, start : start + e.shape[0]] = e.to(embeds.dtype)
        cache, prefix_mask = self._prefix_cache(modules, room=width + kvcache.GROW)
        full_mask = mask if prefix_mask is None else torch.cat([prefix_mask, mask], dim=1)
        positions = (full_mask.cumsum(dim=1) - 1).clamp(min=0)[:, -width:]
        return _Inputs(None if embeds is not None else ids, embeds, full_mask, positions, cache)

    def _prefix_cache(
        self, modules: Sequence[Resident | None], room: int
    ) -> tuple[DynamicCache, torch.Tensor | None]:
        """A cache holding the rows' prefixes, with `room` free columns after them; and its mask."""
        prefixes = [m.weights.prefix.kv if m and m.weights.prefix is not None else None for m in modules]
        width = max((p.shape[3] for p in prefixes if p is not None), default=0)
        if width == 0:
            layers, heads, head_dim = self._kv_shape
            return kvcache.empty_cache(
                len(modules), heads, head_dim, layers, room, self.dtype, self.device
            ), None
        first = next(p for p in prefixes if p is not None)
        layers, _, heads, _, head_dim = first.shape
        # [layers, 2, B, kv_heads, width, head_dim]: each row's prefix right-aligned, zeros before it.
        kv = torch.zeros(
            (layers, 2, len(modules), heads, width, head_dim), dtype=self.dtype, device=self.device
        )
        mask = torch.zeros((len(modules), width), dtype=torch.long, device=self.device)
        for i, p in enumerate(prefixes):
            if p is not None:
                kv[:, :, i, :, width - p.shape[3] :, :] = p
                mask[i, width - p.shape[3] :] = 1
        return kvcache.make_cache([(kv[layer, 0], kv[layer, 1]) for layer in range(layers)], room), mask

    def _set_lora(self, slots: torch.Tensor, ranks: torch.Tensor) -> None:
        self.lora.set(slots, int(ranks.max()) if ranks.numel() else 0)

    @staticmethod
    def _lora_rows(
        modules: Sequence[Resident | None], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        slots = torch.tensor([m.lora_slot if m else 0 for m in modules], dtype=torch.long, device=device)
        ranks = torch.tensor([m.lora_rank if m else 0 for m in modules], dtype=torch.long)
        return slots, ranks

    def _forward(self, inputs: _Inputs, **kwargs: Any) -> Any:
        return self.model(
            input_ids=inputs.ids,
            inputs_embeds=inputs.embeds,
            attention_mask=inputs.mask,
            position_ids=inputs.positions,
            past_key_values=inputs.cache,
            **kwargs,
        )

    @torch.inference_mode()
    def prefill(
        self, sequences: list[list[int]], rows: list[Any], modules: Sequence[Resident | None] | None = None
    ) -> tuple[Batch, torch.Tensor]:
        """Run the prompts through the model -> (a batch holding their cache, last logits [B, V])."""
        modules = modules or [None] * len(sequences)
        inputs = self._build(sequences, modules)
        slots, ranks = self._lora_rows(modules, self.device)
        self._set_lora(slots, ranks)
        out = self._forward(inputs, use_cache=True, logits_to_keep=1)
        batch = Batch(
            rows=rows,
            cache=out.past_key_values,
            attention_mask=inputs.mask,
            positions=inputs.mask.sum(dim=1),
            next_ids=torch.zeros(len(rows), dtype=torch.long, device=self.device),
            lora_slots=slots,
            lora_ranks=ranks,
        )
        return batch, out.logits[:, -1, :]

    @torch.inference_mode()
    def decode(self, batch: Batch) -> torch.Tensor:
        """Feed each row's next token; the cache grows by one column. -> logits [B, V]."""
        ones = torch.ones((len(batch), 1), dtype=batch.attention_mask.dtype, device=self.device)
        mask = torch.cat([batch.attention_mask, ones], dim=1)
        self._set_lora(batch.lora_slots, batch.lora_ranks)
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
    def score(self, pairs: list[tuple[list[int], list[int]]], module: Resident | None = None) -> list[float]:
        """Sum of log p(continuation | prompt) for each (prompt ids, continuation ids), in one forward."""
        modules = [module] * len(pairs)
        inputs = self._build([p + c for p, c in pairs], modules)
        self._set_lora(*self._lora_rows(modules, self.device))
        keep = max(len(c) for _, c in pairs) + 1  # the logits that predict any continuation token
        logits = self._forward(inputs, use_cache=False, logits_to_keep=keep).logits.float()  # [B, keep, V]
        lse = torch.logsumexp(logits, dim=-1)  # [B, keep]
        totals = []
        for row, (_, cont) in enumerate(pairs):
            # Left padding puts the continuation at the end: token j is predicted at kept column
            # keep - len(cont) - 1 + j.
            cols = torch.arange(keep - len(cont) - 1, keep - 1, device=logits.device)
            target = torch.tensor(cont, dtype=torch.long, device=logits.device)
            totals.append(float((logits[row, cols, target] - lse[row, cols]).sum()))
        return totals
