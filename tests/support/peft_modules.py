"""PEFT modules for tests, made by PEFT itself on a tiny base model, with non-trivial weights.

PEFT initialises LoRA's B (and a zero-init prefix) to zeros, which would make every module a no-op
and every comparison vacuous; these helpers overwrite the trainable tensors with seeded noise
before saving, so a module visibly changes the model's output.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

LLAMA_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
LLAMA_ALL_LINEAR = [*LLAMA_ATTENTION, "gate_proj", "up_proj", "down_proj"]


def _base(base_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir)


def _perturb(peft_model: Any, seed: int, scale: float) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


def save_module(base_dir: Path, out_dir: Path, config: Any, *, seed: int = 0, scale: float = 0.5) -> Path:
    """Wrap the base model with `config`, randomise the module's weights, save it in PEFT format."""
    from peft import get_peft_model

    model = get_peft_model(_base(base_dir), config)
    _perturb(model, seed, scale)
    model.save_pretrained(out_dir)
    return out_dir


def prefix(
    base_dir: Path, out_dir: Path, *, tokens: int = 8, projection: bool = False, seed: int = 0
) -> Path:
    from peft import PrefixTuningConfig, TaskType

    config = PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=tokens,
        prefix_projection=projection,
        encoder_hidden_size=32,
    )
    return save_module(base_dir, out_dir, config, seed=seed)


def prompt_tuning(base_dir: Path, out_dir: Path, *, tokens: int = 8, seed: int = 0) -> Path:
    from peft import PromptTuningConfig, TaskType

    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=tokens)
    return save_module(base_dir, out_dir, config, seed=seed)


def p_tuning(base_dir: Path, out_dir: Path, *, tokens: int = 8, seed: int = 0) -> Path:
    from peft import PromptEncoderConfig, TaskType

    config = PromptEncoderConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=tokens, encoder_hidden_size=32
    )
    return save_module(base_dir, out_dir, config, seed=seed)


def lora(
    base_dir: Path,
    out_dir: Path,
    *,
    targets: list[str] | None = None,
    r: int = 4,
    alpha: int = 8,
    rslora: bool = False,
    seed: int = 0,
    **extra: Any,
) -> Path:
    from peft import LoraConfig, TaskType

    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        target_modules=targets or ["q_proj", "v_proj"],
        r=r,
        lora_alpha=alpha,
        use_rslora=rslora,
        lora_dropout=0.0,
        **extra,
    )
    return save_module(base_dir, out_dir, config, seed=seed, scale=0.3)


def ia3(base_dir: Path, out_dir: Path, *, seed: int = 0) -> Path:
    """An (IA)³ module: a real PEFT type that plugboard does not serve."""
    from peft import IA3Config, TaskType

    config = IA3Config(
        task_type=TaskType.CAUSAL_LM,
        target_modules=["k_proj", "v_proj", "down_proj"],
        feedforward_modules=["down_proj"],
    )
    return save_module(base_dir, out_dir, config, seed=seed)


def module_builder(root: Path, llama_dir: Path, gpt2_dir: Path) -> Callable[[str], Path]:
    """A function name -> module directory that builds each named module once, on first use, under root."""
    recipes: dict[str, Callable[[Path], Path]] = {
        "llama-prefix": lambda out: prefix(llama_dir, out),
        "llama-prefix-proj": lambda out: prefix(llama_dir, out, projection=True, seed=1),
        "llama-prompt": lambda out: prompt_tuning(llama_dir, out),
        "llama-ptuning": lambda out: p_tuning(llama_dir, out),
        "llama-lora-attn": lambda out: lora(llama_dir, out, targets=LLAMA_ATTENTION),
        "llama-lora-all": lambda out: lora(llama_dir, out, targets=LLAMA_ALL_LINEAR, r=8, alpha=16, seed=2),
        "llama-rslora": lambda out: lora(llama_dir, out, targets=LLAMA_ATTENTION, r=8, alpha=4, rslora=True),
        "llama-lora-patterns": lambda out: lora(
            llama_dir,
            out,
            targets=LLAMA_ALL_LINEAR,
            rank_pattern={"q_proj": 8, "layers.1.mlp.down_proj": 2},
            alpha_pattern={"v_proj": 32, r"layers\.1\.self_attn\.o_proj": 3},
            seed=3,
        ),
        "gpt2-prefix": lambda out: prefix(gpt2_dir, out, seed=4),
        "gpt2-prefix-proj": lambda out: prefix(gpt2_dir, out, projection=True, seed=5),
        "gpt2-prompt": lambda out: prompt_tuning(gpt2_dir, out, tokens=5),
        "gpt2-ptuning": lambda out: p_tuning(gpt2_dir, out, tokens=6),
        "gpt2-lora": lambda out: lora(gpt2_dir, out, targets=["c_attn", "c_proj", "c_fc"], seed=6),
    }
    built: dict[str, Path] = {}

    def build(name: str) -> Path:
        if name not in built:
            built[name] = recipes[name](root / name)
        return built[name]

    return build


def copy_module(src: Path, dst: Path) -> Path:
    """A copy of a module directory, to edit without touching the shared original."""
    import shutil

    shutil.copytree(src, dst)
    return dst


def edit_config(module_dir: Path, *, drop: tuple[str, ...] = (), **changes: Any) -> Path:
    """Rewrite adapter_config.json with `changes` set and the `drop` keys removed."""
    import json

    file = module_dir / "adapter_config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    for key in drop:
        config.pop(key, None)
    file.write_text(json.dumps(config))
    return module_dir


def edit_tensors(module_dir: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """Rewrite adapter_model.safetensors after `edit` changes the name -> tensor dict in place."""
    from safetensors.torch import load_file, save_file

    file = module_dir / "adapter_model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return module_dir
