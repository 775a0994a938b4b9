"""Convert a GGUF file once to a safetensors directory in a cache, so later starts load in under a second."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from plugboard_server.errors import ModelLoadError

log = logging.getLogger(__name__)

MARKER = "plugboard.json"  # written last: a directory without it is an interrupted conversion


def default_cache_dir() -> Path:
    env = os.environ.get("PLUGBOARD_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "plugboard"


def _cache_key(gguf_path: Path) -> str:
    st = gguf_path.stat()
    ident = f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def converted_dir(gguf_path: Path, cache_dir: Path) -> Path:
    return cache_dir / "models" / f"{gguf_path.stem}-{_cache_key(gguf_path)}"


def read_marker(model_dir: Path) -> dict | None:
    try:
        return json.loads((model_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def ensure_converted(gguf_path: Path, cache_dir: Path, name: str | None = None) -> Path:
    """Return a safetensors copy of `gguf_path`, converting it first if the cache has none.

    The conversion goes to a temporary directory that is renamed into place once complete, so an
    interrupted conversion or two servers converting at once never leave a half-written model.
    """
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    target = converted_dir(gguf_path, cache_dir)
    if read_marker(target) is not None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to safetensors in %s (once; later starts reuse it)", gguf_path, target)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        _convert(gguf_path, tmp, name or gguf_path.stem)
        try:
            os.rename(tmp, target)
        except OSError:
            if read_marker(target) is None:  # not another converter that won the race
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf_path: Path, out: Path, name: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, fname = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32)
    except Exception as exc:  # transformers raises many kinds here; all mean "cannot read this GGUF"
        raise ModelLoadError(f"cannot load GGUF {gguf_path}: {exc}") from exc
    # A GGUF-loaded model carries a quantizer that makes save_pretrained refuse; the weights are
    # already de-quantized to float32, so both can go.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = name
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for f in out.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    (out / MARKER).write_text(json.dumps({"name": name, "source": str(gguf_path)}, indent=2))
