"""read_adapter: the tensors it returns equal what PEFT itself computes from the same module directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from plugboard_server.adapters import weights as weights_module
from plugboard_server.adapters.formats import read_spec
from plugboard_server.adapters.shape import model_shape
from plugboard_server.adapters.types import AdapterLimits, ModelShape
from plugboard_server.adapters.weights import read_adapter
from plugboard_server.errors import IncompatibleAdapter
from tests.support import peft_modules as pm

LIMITS = AdapterLimits()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_gpt2_dir: Path):
    return pm.module_builder(tmp_path_factory.mktemp("peft"), tiny_model_dir, tiny_gpt2_dir)


@pytest.fixture(scope="module")
def shapes(tiny_model, tiny_gpt2) -> dict[str, ModelShape]:
    return {"llama": model_shape(tiny_model.model), "gpt2": model_shape(tiny_gpt2.model)}


@pytest.fixture(scope="module")
def base_dirs(tiny_model_dir: Path, tiny_gpt2_dir: Path) -> dict[str, Path]:
    return {"llama": tiny_model_dir, "gpt2": tiny_gpt2_dir}


def peft_model(base_dir: Path, module_dir: Path):
    """PEFT's own reading of the module, on a fresh base model (LoRA modifies the model it wraps)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, module_dir).eval()


def load(built, shapes, name: str, **kwargs):
    return read_adapter(built(name), shapes[name.split("-")[0]], LIMITS, **kwargs)


@pytest.mark.parametrize("name", ["llama-prefix", "llama-prefix-proj", "gpt2-prefix", "gpt2-prefix-proj"])
def test_prefix_kv_equals_peft_get_prompt(built, shapes, base_dirs, name):
    arch = name.split("-")[0]
    shape = shapes[arch]
    kv = load(built, shapes, name).prefix.kv
    assert kv.shape == (shape.num_layers, 2, shape.num_key_value_heads, 8, shape.head_dim)
    assert kv.is_contiguous() and kv.dtype == torch.float32
    with torch.no_grad():
        cache = peft_model(base_dirs[arch], built(name)).get_prompt(batch_size=1)
    assert len(cache.layers) == shape.num_layers
    for i, layer in enumerate(cache.layers):
        assert torch.equal(kv[i, 0], layer.keys[0]), f"layer {i} keys"
        assert torch.equal(kv[i, 1], layer.values[0]), f"layer {i} values"
    assert kv.abs().sum() > 0  # the helpers randomise the module, so the comparison is not vacuous


@pytest.mark.parametrize("name", ["llama-prompt", "llama-ptuning", "gpt2-prompt", "gpt2-ptuning"])
def test_prompt_embeddings_equal_peft(built, shapes, base_dirs, name):
    adapter = load(built, shapes, name)
    model = peft_model(base_dirs[name.split("-")[0]], built(name))
    with torch.no_grad():
        prompt = model.get_prompt(batch_size=1)[0]
    assert torch.equal(adapter.prompt.embeddings, prompt)
    assert torch.equal(adapter.prompt.embeddings, model.prompt_encoder["default"].embedding.weight)
    hidden = shapes[name.split("-")[0]].hidden_size
    assert adapter.prompt.embeddings.shape == (adapter.spec.num_virtual_tokens, hidden)


def _peft_lora_layers(model) -> dict:
    inner = model.base_model.model
    return {
        name: module for name, module in inner.named_modules() if hasattr(module, "lora_A") and module.lora_A
    }


@pytest.mark.parametrize(
    "name", ["llama-lora-attn", "llama-lora-all", "llama-rslora", "llama-lora-patterns", "gpt2-lora"]
)
def test_lora_equals_peft(built, shapes, base_dirs, name):
    adapter = load(built, shapes, name)
    model = peft_model(base_dirs[name.split("-")[0]], built(name))
    theirs = _peft_lora_layers(model)
    assert set(adapter.lora.layers) == set(theirs)
    assert adapter.lora.rank == max(module.r["default"] for module in theirs.values())
    for path, module in theirs.items():
        ours = adapter.lora.layers[path]
        scaling = module.scaling["default"]
        assert torch.equal(ours.a, module.lora_A["default"].weight), path
        assert torch.allclose(ours.b, module.lora_B["default"].weight * scaling, rtol=1e-6, atol=0), path
        # The delta the engine adds, x @ a.T @ b.T, is what PEFT's layer adds to its base layer.
        x = torch.randn(3, ours.a.shape[1], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = module(x) - module.base_layer(x)
        torch.testing.assert_close(x @ ours.a.T @ ours.b.T, expected, rtol=1e-4, atol=1e-5)


def test_lora_scalings(built, shapes):
    """The cases the comparison above covers, spelled out: plain, rsLoRA, alpha_pattern and rank_pattern."""

    def ratio(name: str, path: str) -> float:
        layer = load(built, shapes, name).lora.layers[path]
        raw = read_raw(built(name), path)
        return (layer.b / raw).mean().item()

    def read_raw(module_dir: Path, path: str) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(module_dir / "adapter_model.safetensors")[f"base_model.model.{path}.lora_B.weight"]

    attn = "model.layers.0.self_attn"
    assert ratio("llama-lora-attn", f"{attn}.q_proj") == pytest.approx(8 / 4)
    assert ratio("llama-rslora", f"{attn}.q_proj") == pytest.approx(4 / 8**0.5)
    assert ratio("llama-lora-patterns", f"{attn}.q_proj") == pytest.approx(8 / 8)  # rank 8 by rank_pattern
    assert ratio("llama-lora-patterns", f"{attn}.v_proj") == pytest.approx(
        32 / 4
    )  # alpha 32 by alpha_pattern
    assert ratio("llama-lora-patterns", "model.layers.0.self_attn.o_proj") == pytest.approx(8 / 4)
    assert ratio("llama-lora-patterns", "model.layers.1.self_attn.o_proj") == pytest.approx(3 / 4)
    assert ratio("llama-lora-patterns", "model.layers.1.mlp.down_proj") == pytest.approx(8 / 2)


def test_dtype_and_nbytes(built, shapes):
    adapter = load(built, shapes, "llama-lora-all", dtype=torch.bfloat16)
    assert {t.dtype for layer in adapter.lora.layers.values() for t in (layer.a, layer.b)} == {torch.bfloat16}
    assert adapter.nbytes == sum(2 * (la.a.numel() + la.b.numel()) for la in adapter.lora.layers.values())
    prefix = load(built, shapes, "llama-prefix", dtype=torch.float16, device=torch.device("cpu"))
    assert prefix.prefix.kv.dtype == torch.float16 and prefix.prefix.kv.is_contiguous()


def test_half_precision_module(built, shapes, tmp_path):
    """A module saved in bf16 is scaled in float32 and rounded once."""
    module = pm.copy_module(built("llama-lora-attn"), tmp_path / "m")
    pm.edit_tensors(module, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    adapter = read_adapter(module, shapes["llama"], LIMITS)
    reference = load(built, shapes, "llama-lora-attn")
    for path, layer in adapter.lora.layers.items():
        assert layer.b.dtype == torch.float32
        torch.testing.assert_close(layer.b, reference.lora.layers[path].b, rtol=1e-2, atol=1e-3)


def test_spec_matches_read_spec(built, shapes):
    adapter = load(built, shapes, "gpt2-lora")
    assert adapter.spec == read_spec(built("gpt2-lora"), shapes["gpt2"], LIMITS)
    assert adapter.kind is adapter.spec.kind and adapter.prefix is None and adapter.prompt is None


def test_refused_module_loads_nothing(built, shapes, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("tensors were loaded for a refused module")

    monkeypatch.setattr(weights_module, "load_file", forbidden)
    with pytest.raises(IncompatibleAdapter, match="num_attention_heads"):
        read_adapter(built("gpt2-prefix"), shapes["llama"], LIMITS)
    with pytest.raises(IncompatibleAdapter, match="max_lora_rank"):
        read_adapter(built("llama-lora-all"), shapes["llama"], AdapterLimits(max_lora_rank=4))


def test_file_changed_after_validation(built, shapes, monkeypatch):
    monkeypatch.setattr(weights_module, "load_file", lambda *a, **k: {"prompt_embeddings": torch.zeros(1, 1)})
    with pytest.raises(IncompatibleAdapter, match="changed while it was being read"):
        read_adapter(built("llama-prefix"), shapes["llama"], LIMITS)
