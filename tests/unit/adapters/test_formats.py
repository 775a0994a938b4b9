"""read_spec: PEFT module directories made by PEFT itself, accepted or refused with a clear reason."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from plugboard_server.adapters.formats import read_spec
from plugboard_server.adapters.shape import model_shape
from plugboard_server.adapters.types import AdapterLimits, ModelShape, ModuleKind
from plugboard_server.errors import IncompatibleAdapter
from tests.support import peft_modules as pm

LIMITS = AdapterLimits()
LLAMA_PREFIX = "base_model.model.model.layers"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_gpt2_dir: Path):
    return pm.module_builder(tmp_path_factory.mktemp("peft"), tiny_model_dir, tiny_gpt2_dir)


@pytest.fixture(scope="module")
def llama(tiny_model) -> ModelShape:
    return model_shape(tiny_model.model)


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2) -> ModelShape:
    return model_shape(tiny_gpt2.model)


@pytest.fixture
def copy(built: Callable[[str], Path], tmp_path: Path) -> Callable[[str], Path]:
    """A private, editable copy of a built module."""
    return lambda name: pm.copy_module(built(name), tmp_path / name)


def refused(path: Path, shape: ModelShape, *fragments: str, limits: AdapterLimits = LIMITS) -> str:
    with pytest.raises(IncompatibleAdapter) as info:
        read_spec(path, shape, limits)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- accepted modules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "peft_type", "tokens"),
    [
        ("llama-prefix", ModuleKind.PREFIX, "PREFIX_TUNING", 8),
        ("llama-prefix-proj", ModuleKind.PREFIX, "PREFIX_TUNING", 8),
        ("llama-prompt", ModuleKind.PROMPT, "PROMPT_TUNING", 8),
        ("llama-ptuning", ModuleKind.PROMPT, "P_TUNING", 8),
        ("gpt2-prefix", ModuleKind.PREFIX, "PREFIX_TUNING", 8),
        ("gpt2-prefix-proj", ModuleKind.PREFIX, "PREFIX_TUNING", 8),
        ("gpt2-prompt", ModuleKind.PROMPT, "PROMPT_TUNING", 5),
        ("gpt2-ptuning", ModuleKind.PROMPT, "P_TUNING", 6),
    ],
)
def test_prompt_learning_specs(
    built, llama, gpt2, tiny_model_dir, tiny_gpt2_dir, name, kind, peft_type, tokens
):
    shape, base = (llama, tiny_model_dir) if name.startswith("llama") else (gpt2, tiny_gpt2_dir)
    spec = read_spec(built(name), shape, LIMITS)
    assert (spec.kind, spec.peft_type, spec.num_virtual_tokens) == (kind, peft_type, tokens)
    assert (spec.rank, spec.target_modules) == (0, ())
    assert spec.base_model_name == str(base)
    assert spec.size_bytes == (built(name) / "adapter_model.safetensors").stat().st_size


@pytest.mark.parametrize(
    ("name", "leaves", "rank"),
    [
        ("llama-lora-attn", pm.LLAMA_ATTENTION, 4),
        ("llama-lora-all", pm.LLAMA_ALL_LINEAR, 8),
        ("llama-rslora", pm.LLAMA_ATTENTION, 8),
        ("llama-lora-patterns", pm.LLAMA_ALL_LINEAR, 8),  # rank_pattern raises q_proj to 8
        ("gpt2-lora", ["c_attn", "c_proj", "c_fc", "c_proj"], 4),  # c_proj in attn and in mlp
    ],
)
def test_lora_specs(built, llama, gpt2, name, leaves, rank):
    shape = llama if name.startswith("llama") else gpt2
    spec = read_spec(built(name), shape, LIMITS)
    assert (spec.kind, spec.peft_type, spec.rank, spec.num_virtual_tokens) == (
        ModuleKind.LORA,
        "LORA",
        rank,
        0,
    )
    assert list(spec.target_modules) == sorted(spec.target_modules)
    assert set(spec.target_modules) <= set(shape.linear_layers)
    assert len(spec.target_modules) == shape.num_layers * len(leaves)
    assert {path.rsplit(".", 1)[-1] for path in spec.target_modules} == set(leaves)


def test_lora_rank_limit_is_inclusive(built, llama):
    assert read_spec(built("llama-lora-all"), llama, AdapterLimits(max_lora_rank=8)).rank == 8


def test_adapter_name_infix_is_accepted(copy, llama):
    def rename(tensors: dict) -> None:
        for key in list(tensors):
            tensors[key.replace(".weight", ".default.weight")] = tensors.pop(key)

    spec = read_spec(pm.edit_tensors(copy("llama-lora-attn"), rename), llama, LIMITS)
    assert len(spec.target_modules) == 8


def test_safetensors_wins_over_a_stray_pickle(copy, llama):
    module = copy("llama-prefix")
    torch.save({"x": torch.zeros(1)}, module / "adapter_model.bin")
    assert read_spec(module, llama, LIMITS).kind is ModuleKind.PREFIX


# --- directory and file problems ----------------------------------------------------------------------


def test_missing_directory(tmp_path, llama):
    refused(tmp_path / "nope", llama, "'nope'", "does not exist")


def test_missing_files(copy, llama):
    module = copy("llama-prefix")
    (module / "adapter_config.json").unlink()
    refused(module, llama, "adapter_config.json is missing")
    (module / "adapter_model.safetensors").unlink()
    refused(module, llama, "adapter_model.safetensors is missing")


@pytest.mark.parametrize("filename", ["adapter_model.bin", "weights.pt", "state.pkl"])
def test_pickle_only_module_is_refused_without_unpickling(copy, llama, monkeypatch, filename):
    module = copy("llama-lora-attn")
    state = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)}
    torch.save(state, module / filename)
    (module / "adapter_model.safetensors").unlink()

    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle file was loaded")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    refused(module, llama, filename, "never loads pickle", "safe_serialization=True")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json", "adapter_config.json is not valid JSON"),
        ("[1, 2]", "must hold a JSON object, not a list"),
        ("{}", "peft_type is missing"),
        ('{"peft_type": "NONSENSE"}', "'NONSENSE' is not supported"),
        ('{"peft_type": ["LORA"]}', "['LORA'] is not supported"),
    ],
)
def test_bad_config(copy, llama, text, fragment):
    module = copy("llama-prefix")
    (module / "adapter_config.json").write_text(text)
    refused(module, llama, fragment)


def test_real_ia3_module_is_refused(tmp_path, tiny_model_dir, llama):
    module = pm.ia3(tiny_model_dir, tmp_path / "ia3")
    refused(module, llama, "'IA3' is not supported", "PREFIX_TUNING, PROMPT_TUNING, P_TUNING, LORA")


@pytest.mark.parametrize(
    "peft_type", ["ADALORA", "LOHA", "LOKR", "MULTITASK_PROMPT_TUNING", "CARTRIDGE", "lora"]
)
def test_unsupported_peft_types(copy, llama, peft_type):
    module = pm.edit_config(copy("llama-lora-attn"), peft_type=peft_type)
    refused(module, llama, f"peft_type {peft_type!r} is not supported", "LORA")


def test_corrupt_safetensors(copy, llama):
    module = copy("llama-prefix")
    (module / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}..")
    refused(module, llama, "adapter_model.safetensors is not a readable safetensors file")


def test_integer_tensors(copy, llama):
    def quantize(tensors: dict) -> None:
        tensors["prompt_embeddings"] = tensors["prompt_embeddings"].to(torch.int8)

    refused(
        pm.edit_tensors(copy("llama-prefix"), quantize),
        llama,
        "must be F16, BF16, F32 or F64",
        "prompt_embeddings (I8)",
    )


# --- prefix and prompt refusals -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"num_layers": 24}, "num_layers: the module has 24, the base model has 2"),
        ({"num_attention_heads": 4}, "num_attention_heads: the module has 4, the base model has 2"),
        ({"token_dim": 64}, "token_dim: the module has 64, the base model has 32"),
        ({"num_transformer_submodules": 2}, "num_transformer_submodules: the module has 2"),
        ({"num_layers": "2"}, "num_layers must be an integer, found '2'"),
        ({"num_virtual_tokens": 0}, "num_virtual_tokens must be at least 1"),
    ],
)
def test_prefix_config_mismatch(copy, llama, changes, fragment):
    refused(pm.edit_config(copy("llama-prefix"), **changes), llama, fragment)


def test_prefix_missing_field(copy, llama):
    refused(pm.edit_config(copy("llama-prefix"), drop=("token_dim",)), llama, "token_dim must be an integer")


def test_gpt2_prefix_on_llama(built, llama):
    message = refused(built("gpt2-prefix"), llama, "different base model (llama here)")
    assert "num_attention_heads: the module has 4, the base model has 2" in message
    assert "token_dim: the module has 64, the base model has 32" in message


@pytest.mark.parametrize("name", ["llama-prefix", "llama-prompt", "llama-ptuning"])
def test_virtual_token_limit(built, llama, name):
    refused(
        built(name),
        llama,
        "num_virtual_tokens: the module has 8",
        "limit of 7",
        limits=AdapterLimits(max_prefix_tokens=7),
    )
    assert read_spec(built(name), llama, AdapterLimits(max_prefix_tokens=8)).num_virtual_tokens == 8


@pytest.mark.parametrize(
    ("name", "edit", "fragment"),
    [
        ("llama-prefix", lambda t: t.update(prompt_embeddings=torch.zeros(8, 127)), "has shape [8, 127]"),
        ("llama-prefix", lambda t: t.update(prompt_embeddings=torch.zeros(9, 128)), "expected [8, 128]"),
        ("llama-prompt", lambda t: t.update(prompt_embeddings=torch.zeros(8, 32)), "has shape [8, 32]"),
        ("llama-prefix", lambda t: t.update(extra=torch.zeros(1)), "unexpected tensor(s) extra"),
        ("llama-ptuning", lambda t: t.clear(), "lacks tensor(s) prompt_embeddings"),
        (
            "llama-prompt",
            lambda t: t.update(embeddings=t.pop("prompt_embeddings")),
            "lacks tensor(s) prompt_emb",
        ),
    ],
)
def test_prompt_learning_tensor_problems(copy, llama, name, edit, fragment):
    refused(pm.edit_tensors(copy(name), edit), llama, fragment)


def test_prompt_token_dim(copy, llama):
    module = pm.edit_config(copy("llama-prompt"), token_dim=32)
    refused(module, llama, "token_dim: the module has 32, the base model has 64")


# --- LoRA refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"use_dora": True}, "DoRA (use_dora)"),
        ({"bias": "all"}, "bias='all'"),
        ({"bias": "lora_only"}, "bias='lora_only'"),
        ({"lora_bias": True}, "lora_bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_parameters": ["mlp.experts.down_proj"]}, "target_parameters"),
        ({"trainable_token_indices": [0, 1]}, "trainable_token_indices"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
        ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens"),
        ({"use_qalora": True}, "use_qalora"),
        ({"kasa_config": {"r": 4}}, "kasa_config"),
        ({"init_lora_weights": "pissa_niter_4"}, "rewrites the base weights"),
        ({"init_lora_weights": "olora"}, "path_initial_model_for_weight_conversion"),
        ({"alpha_pattern": {"(": 3}}, "alpha_pattern key '(' is not a regex"),
        ({"alpha_pattern": {"q_proj": "big"}}, "alpha_pattern['q_proj'] must be a number"),
        ({"lora_alpha": None}, "lora_alpha must be a number"),
    ],
)
def test_lora_config_refusals(copy, llama, changes, fragment):
    refused(pm.edit_config(copy("llama-lora-attn"), **changes), llama, fragment)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"lora_bias": True}, "lora_bias"),
        ({"bias": "lora_only"}, "bias='lora_only'"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"trainable_token_indices": [0, 1]}, "trainable_token_indices"),
    ],
)
def test_real_peft_modules_with_unsupported_features(tmp_path, tiny_model_dir, llama, extra, fragment):
    module = pm.lora(tiny_model_dir, tmp_path / "m", **extra)
    refused(module, llama, fragment)


@pytest.mark.parametrize(
    ("targets", "fragment"),
    [
        (["embed_tokens"], "an embedding layer adapter"),
        (["lm_head"], "lm_head (the output layer)"),
        (["q_proj", "lm_head"], "lm_head (the output layer)"),
    ],
)
def test_real_lora_on_embeddings_and_output(tmp_path, tiny_model_dir, llama, targets, fragment):
    refused(pm.lora(tiny_model_dir, tmp_path / "m", targets=targets), llama, fragment)


def _a(layer: int, leaf: str) -> str:
    return f"{LLAMA_PREFIX}.{layer}.self_attn.{leaf}.lora_A.weight"


def _b(layer: int, leaf: str) -> str:
    return f"{LLAMA_PREFIX}.{layer}.self_attn.{leaf}.lora_B.weight"


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda t: t.pop(_b(1, "k_proj")), "lacks lora_B for model.layers.1.self_attn.k_proj"),
        (lambda t: t.pop(_a(0, "q_proj")), "lacks lora_A for model.layers.0.self_attn.q_proj"),
        (lambda t: t.update({_a(0, "q_proj"): torch.zeros(4, 63)}), "needs [r, 64] and [64, r]"),
        (lambda t: t.update({_b(0, "k_proj"): torch.zeros(64, 4)}), "needs [r, 64] and [32, r]"),
        (lambda t: t.update({_b(0, "k_proj"): torch.zeros(32, 3)}), "lora_B [32, 3]"),
        (lambda t: t.update({_a(0, "k_proj"): torch.zeros(4, 64, 1)}), "lora_A has shape [4, 64, 1]"),
        (lambda t: t.update({"something_else": torch.zeros(2)}), "unexpected tensor(s) something_else"),
        (lambda t: t.update({_b(0, "q_proj")[:-6] + "bias": torch.zeros(64)}), "lora_B.bias"),
        (
            lambda t: t.update({_a(0, "q_proj").replace("lora_A", "lora_magnitude_vector"): torch.zeros(64)}),
            "DoRA magnitude vectors",
        ),
        (
            lambda t: t.update({_a(0, "q_proj").replace(".weight", ".default.weight"): torch.zeros(4, 64)}),
            "two lora_A",
        ),
        (
            lambda t: t.update({f"{LLAMA_PREFIX}.7.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)}),
            "layers.7",
        ),
        (lambda t: t.clear(), "holds no LoRA tensors"),
    ],
)
def test_lora_tensor_problems(copy, llama, edit, fragment):
    refused(pm.edit_tensors(copy("llama-lora-attn"), edit), llama, fragment)


def test_lora_rank_limit(built, llama):
    refused(
        built("llama-lora-patterns"),
        llama,
        "LoRA rank 8",
        "limit of 6",
        limits=AdapterLimits(max_lora_rank=6),
    )


def test_gpt2_lora_on_llama(built, llama):
    message = refused(
        built("gpt2-lora"), llama, "cannot adapt in this llama model", "transformer.h.0.attn.c_attn"
    )
    assert "and 5 more" in message


def test_llama_lora_on_gpt2(built, gpt2):
    refused(built("llama-lora-attn"), gpt2, "not a linear layer of the base model")


def test_messages_do_not_leak_server_paths(tmp_path, copy, llama):
    module = pm.edit_config(copy("llama-prefix"), num_layers=3)
    assert str(tmp_path) not in refused(module, llama)
    (module / "adapter_config.json").write_text(json.dumps([]))
    assert str(tmp_path) not in refused(module, llama)
