"""What the benchmarks share: the base model, PEFT modules to serve, an in-process server, percentiles."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from plugboard_server.models.default import provision
from plugboard_server.models.loading import LoadedModel, load_model
from tests.support import peft_modules as pm
from tests.support.server import ServerThread, server_config
from tests.support.tiny_model import build_llama

KINDS = ("prefix", "prompt", "lora")
CACHE = Path(tempfile.gettempdir()) / "plugboard-bench"


def base_model_dir(model: str = "default") -> Path:
    """'default' (the embedded SmolLM2-135M-Instruct), 'tiny' (a random 2-layer llama: smoke runs), a path."""
    if model == "default":
        return provision()
    if model == "tiny":
        path = CACHE / "tiny-llama"
        if not (path / "config.json").is_file():
            build_llama(path)
        return path
    return Path(model)


def make_modules(
    base_dir: Path,
    root: Path,
    count: int,
    *,
    tokens: int = 16,
    rank: int = 8,
    kinds: Sequence[str] = KINDS,
    seed: int = 0,
) -> list[Path]:
    """`count` PEFT modules cycling through `kinds`, cached in root (random weights: speed, not quality)."""
    out = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        path = root / f"{kind}-t{tokens}-r{rank}-{seed + i:04d}"
        if not (path / "adapter_model.safetensors").is_file():
            if kind == "prefix":
                pm.prefix(base_dir, path, tokens=tokens, seed=seed + i)
            elif kind == "prompt":
                pm.prompt_tuning(base_dir, path, tokens=tokens, seed=seed + i)
            else:
                pm.lora(base_dir, path, targets=["q_proj", "v_proj"], r=rank, alpha=2 * rank, seed=seed + i)
        out.append(path)
    return out


@contextmanager
def serve(model: LoadedModel | Path, **config: Any) -> Iterator[ServerThread]:
    """A plugboard server in this process on free ports (metrics off unless asked)."""
    loaded = model if isinstance(model, LoadedModel) else load_model(str(model))
    server = ServerThread(server_config(**{"metrics_port": -1, **config}), loader=lambda: loaded).start()
    try:
        yield server
    finally:
        server.stop()


def percentile(xs: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by the nearest-rank method; NaN for no data."""
    if not xs:
        return math.nan
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
