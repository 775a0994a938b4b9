"""The multi-LoRA layer: per-row deltas from slot buffers, equal to each adapter applied alone."""

from __future__ import annotations

import torch
from torch import nn

from plugboard_server.adapters.lora import LoraBatch, LoraSlots, MultiLoraLinear, unwrap
from plugboard_server.adapters.shape import model_shape
from plugboard_server.adapters.types import LoraLayer, LoraWeights


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))


def _adapter(seed: int, rank: int, paths: tuple[str, ...] = ("0", "2")) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    dims = {"0": (8, 6), "2": (6, 4)}
    layers = {
        p: LoraLayer(
            a=torch.randn(rank, dims[p][0], generator=g), b=torch.randn(dims[p][1], rank, generator=g)
        )
        for p in paths
    }
    return LoraWeights(layers=layers, rank=rank)


def _reference(model: nn.Module, x: torch.Tensor, lora: LoraWeights | None) -> torch.Tensor:
    h = x
    for name, layer in model.named_children():
        out = layer(h)
        w = lora.layers.get(name) if lora else None
        if w is not None:
            out = out + h @ w.a.t() @ w.b.t()
        h = out
    return h


def test_each_row_gets_its_own_adapter_in_one_forward():
    model = _model()
    plain = _model()
    slots = LoraSlots(model, slots=4, max_rank=8, dtype=torch.float32, device=torch.device("cpu"))
    adapters = {1: _adapter(1, 2), 2: _adapter(2, 8), 3: _adapter(3, 4, paths=("2",))}
    for slot, lora in adapters.items():
        slots.write(slot, lora)
    x = torch.randn(5, 3, 8)  # [rows, tokens, in]
    row_slots = torch.tensor([0, 2, 1, 3, 2])
    slots.batch.set(row_slots, rank=8)
    with torch.inference_mode():
        y = model(x)
        for row, slot in enumerate(row_slots.tolist()):
            ref = _reference(plain, x[row : row + 1], adapters.get(slot))
            torch.testing.assert_close(y[row : row + 1], ref, atol=1e-5, rtol=1e-5)


def test_rewriting_a_slot_is_seen_at_the_next_forward():
    model = _model()
    plain = _model()
    slots = LoraSlots(model, slots=2, max_rank=4, dtype=torch.float32, device=torch.device("cpu"))
    first, second = _adapter(1, 4), _adapter(2, 4)
    slots.write(1, first)
    x = torch.randn(2, 1, 8)
    row_slots = torch.tensor([1, 0])
    with torch.inference_mode():
        slots.batch.set(row_slots, rank=4)
        torch.testing.assert_close(model(x)[:1], _reference(plain, x[:1], first))
        slots.write(1, second)  # the slot goes to another adapter; the rows are the same
        slots.batch.set(row_slots, rank=4)
        torch.testing.assert_close(model(x)[:1], _reference(plain, x[:1], second))
        torch.testing.assert_close(model(x)[1:], _reference(plain, x[1:], None))


def test_no_adapter_rows_leave_the_base_output_untouched():
    batch = LoraBatch()
    batch.set(torch.tensor([0, 0]), rank=0)
    assert batch.slots is None


def test_a_model_wrapped_by_an_earlier_engine_has_the_same_shape(tiny_model):
    fresh = model_shape(tiny_model.model).linear_layers
    slots = LoraSlots(tiny_model.model, slots=2, max_rank=4, dtype=torch.float32, device=torch.device("cpu"))
    path = next(p for p in fresh if p.endswith("q_proj"))
    wrapper = slots._wrap(path)
    try:
        assert model_shape(tiny_model.model).linear_layers == fresh  # a second engine may adapt it too
    finally:
        parent, _, child = path.rpartition(".")
        setattr(tiny_model.model.get_submodule(parent), child, wrapper.base)


def test_a_new_engine_on_the_same_model_starts_from_the_plain_layers(tiny_model):
    path = next(p for p in model_shape(tiny_model.model).linear_layers if p.endswith("q_proj"))
    first = LoraSlots(tiny_model.model, slots=2, max_rank=4, dtype=torch.float32, device=torch.device("cpu"))
    plain = first._wrap(path).base
    LoraSlots(tiny_model.model, slots=2, max_rank=4, dtype=torch.float32, device=torch.device("cpu"))
    assert tiny_model.model.get_submodule(path) is plain  # the earlier wrapper is gone
    first._wrap(path)
    unwrap(tiny_model.model)
    assert not any(isinstance(m, MultiLoraLinear) for m in tiny_model.model.modules())
