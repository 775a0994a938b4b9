"""A directory of many PEFT modules of every kind (and a few broken ones) for a server to serve."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.support import peft_modules as pm


def build_zoo(base_dir: Path, root: Path, *, count: int = 32) -> list[str]:
    """Write `count` good modules, cycling through the kinds, into root/<name>; return their names."""
    makers = [
        lambda out, s: pm.prefix(base_dir, out, tokens=4 + s % 5, seed=s),
        lambda out, s: pm.lora(base_dir, out, targets=["q_proj", "v_proj"], r=2 + s % 4, seed=s),
        lambda out, s: pm.prompt_tuning(base_dir, out, tokens=3 + s % 4, seed=s),
        lambda out, s: pm.prefix(base_dir, out, tokens=3 + s % 3, projection=True, seed=s),
        lambda out, s: pm.lora(base_dir, out, targets=pm.LLAMA_ALL_LINEAR, r=4, alpha=8, seed=s),
        lambda out, s: pm.p_tuning(base_dir, out, tokens=2 + s % 3, seed=s),
        lambda out, s: pm.lora(base_dir, out, targets=pm.LLAMA_ATTENTION, r=8, rslora=True, seed=s),
    ]
    kinds = ["prefix", "lora-qv", "prompt", "prefix-proj", "lora-all", "ptuning", "rslora"]
    names = []
    for i in range(count):
        name = f"{kinds[i % len(makers)]}-{i:02d}"
        makers[i % len(makers)](root / name, i)
        names.append(name)
    return names


def build_broken(base_dir: Path, other_base_dir: Path, root: Path) -> dict[str, str]:
    """Modules the server must refuse: name -> a phrase the refusal must contain."""
    pm.lora(base_dir, root / "rank-too-high", r=32, seed=1)
    pm.lora(base_dir, root / "dora", use_dora=True, seed=2)
    pm.prefix(other_base_dir, root / "other-base", seed=3)
    bad = pm.lora(base_dir, root / "malformed-config", seed=4)
    (bad / "adapter_config.json").write_text("{not json")
    shapes = pm.prefix(base_dir, root / "wrong-shapes", tokens=4, seed=5)
    save_file({"prompt_embeddings": torch.zeros(4, 100)}, str(shapes / "adapter_model.safetensors"))
    return {
        "rank-too-high": "16",
        "dora": "dora",
        "other-base": "num_layers",
        "malformed-config": "adapter_config.json",
        "wrong-shapes": "prompt_embeddings",
    }
