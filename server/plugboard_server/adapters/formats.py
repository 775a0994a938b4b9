"""Read a PEFT module directory's config and safetensors header, and validate it against the base model.

Only the header is read (no tensor data, never a pickle); weights.py loads a module that passes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from plugboard_server.adapters.types import AdapterLimits, AdapterSpec, ModelShape, ModuleKind
from plugboard_server.errors import IncompatibleAdapter

Dims = tuple[int, ...]
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_MISSING = f"{{}} is missing: a PEFT module directory holds {CONFIG_FILE} and {WEIGHTS_FILE}"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_KINDS = {
    "PREFIX_TUNING": ModuleKind.PREFIX,
    "PROMPT_TUNING": ModuleKind.PROMPT,
    "P_TUNING": ModuleKind.PROMPT,
    "LORA": ModuleKind.LORA,
}
_SUPPORTED = ", ".join(_KINDS)
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# PEFT saves LoRA tensors without the adapter name; an infix such as ".default" is accepted defensively.
_LORA_KEY = re.compile(r"base_model\.model\.(?P<path>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight")
# LoRA features that change the forward pass or need more than the low-rank pair: config field -> name.
_LORA_FEATURES = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "a trained bias on lora_B (lora_bias)",
    "modules_to_save": "fully trained copies of layers (modules_to_save)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "layer_replication": "replicated layers (layer_replication)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QALoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
}
_LORA_TENSORS = {
    ".lora_magnitude_vector": "DoRA magnitude vectors",
    ".lora_embedding_": "an embedding layer adapter",
}
# These initialisations rewrite the base weights; the saved adapter only works on that rewritten base.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass(frozen=True)
class LoraLayout:
    a_key: str
    b_key: str
    rank: int
    scaling: float  # alpha / rank, or alpha / sqrt(rank) with rsLoRA


@dataclass(frozen=True)
class ModuleLayout:
    """What validation learned: the spec, plus what weights.py needs to load and convert the tensors."""

    spec: AdapterSpec
    weights_file: Path
    tensor_shapes: dict[str, Dims]
    lora_layers: dict[str, LoraLayout] = field(default_factory=dict)  # module path -> its tensors


def read_spec(path: Path, shape: ModelShape, limits: AdapterLimits) -> AdapterSpec:
    """Validate the module directory at `path` against the base model; return what it is."""
    return inspect_module(path, shape, limits).spec


def inspect_module(path: Path, shape: ModelShape, limits: AdapterLimits) -> ModuleLayout:
    """read_spec, keeping the tensor layout for weights.py."""
    path = Path(path)
    weights_file = _weights_file(path)
    config = _read_config(path / CONFIG_FILE)
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in _KINDS:
        found = "is missing" if peft_type is None else f"{peft_type!r} is not supported"
        raise IncompatibleAdapter(f"{CONFIG_FILE}: peft_type {found}; plugboard serves {_SUPPORTED}")
    kind = _KINDS[peft_type]
    shapes = _read_header(weights_file)
    spec = AdapterSpec(
        kind=kind,
        peft_type=peft_type,
        base_model_name=str(config.get("base_model_name_or_path") or ""),
        size_bytes=weights_file.stat().st_size,
    )
    if kind is ModuleKind.LORA:
        layers = _check_lora(config, shapes, shape, limits)
        spec = dataclasses.replace(
            spec, rank=max(layer.rank for layer in layers.values()), target_modules=tuple(layers)
        )
        return ModuleLayout(spec, weights_file, shapes, layers)
    tokens = _virtual_tokens(config, limits)
    width = _check_prefix(config, shape) if kind is ModuleKind.PREFIX else _check_prompt(config, shape)
    _expect_tensors(shapes, {"prompt_embeddings": (tokens, width)})
    return ModuleLayout(dataclasses.replace(spec, num_virtual_tokens=tokens), weights_file, shapes)


def _weights_file(path: Path) -> Path:
    if not path.is_dir():
        raise IncompatibleAdapter(f"module directory {path.name!r} does not exist or is not a directory")
    weights_file = path / WEIGHTS_FILE
    if weights_file.is_file():
        return weights_file
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
    if pickles:
        raise IncompatibleAdapter(
            f"the module has {_names(pickles)} but no {WEIGHTS_FILE}: plugboard never loads pickle files, "
            "as unpickling can run arbitrary code. Re-save the module with "
            "save_pretrained(..., safe_serialization=True)"
        )
    raise IncompatibleAdapter(_MISSING.format(WEIGHTS_FILE))


def _read_config(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise IncompatibleAdapter(_MISSING.format(CONFIG_FILE))
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IncompatibleAdapter(f"{CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise IncompatibleAdapter(f"{CONFIG_FILE} must hold a JSON object, not a {type(config).__name__}")
    return config


def _read_header(file: Path) -> dict[str, Dims]:
    """Tensor name -> shape, from the header only (get_slice reads no data); floating point only."""
    shapes, odd = {}, []
    try:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = f.get_slice(name)
                shapes[name] = tuple(tensor.get_shape())
                if tensor.get_dtype() not in _FLOAT_DTYPES:
                    odd.append(f"{name} ({tensor.get_dtype()})")
    except (SafetensorError, OSError) as exc:
        raise IncompatibleAdapter(f"{WEIGHTS_FILE} is not a readable safetensors file: {exc}") from exc
    if odd:
        raise IncompatibleAdapter(
            f"{WEIGHTS_FILE}: tensors must be F16, BF16, F32 or F64; found {_names(odd)}"
        )
    return shapes


def _int_field(config: dict[str, Any], name: str) -> int:
    value = config.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise IncompatibleAdapter(f"{CONFIG_FILE}: {name} must be an integer, found {value!r}")
    return value


def _number_field(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise IncompatibleAdapter(f"{CONFIG_FILE}: {name} must be a number, found {value!r}")
    return float(value)


def _virtual_tokens(config: dict[str, Any], limits: AdapterLimits) -> int:
    tokens = _int_field(config, "num_virtual_tokens")
    if tokens < 1:
        raise IncompatibleAdapter(f"{CONFIG_FILE}: num_virtual_tokens must be at least 1, found {tokens}")
    if tokens > limits.max_prefix_tokens:
        raise IncompatibleAdapter(
            f"num_virtual_tokens: the module has {tokens}, more than this server's limit of "
            f"{limits.max_prefix_tokens} (max_prefix_tokens)"
        )
    # 2 means an encoder-decoder module (prompts for both stacks); plugboard serves decoder-only models.
    submodules = config.get("num_transformer_submodules", 1)
    if submodules != 1:
        raise IncompatibleAdapter(
            f"num_transformer_submodules: the module has {submodules!r}, a decoder-only model needs 1 "
            "(this module was made for an encoder-decoder model)"
        )
    return tokens


def _check_prefix(config: dict[str, Any], shape: ModelShape) -> int:
    """The fields PEFT's get_prompt reshapes by; returns the width of prompt_embeddings."""
    layers = _int_field(config, "num_layers")
    heads = _int_field(config, "num_attention_heads")
    dim = _int_field(config, "token_dim")
    # PEFT sizes a prefix by the key/value heads for GQA models (utils/other.py, #1901).
    wanted = {
        "num_layers": (layers, shape.num_layers, ""),
        "num_attention_heads": (heads, shape.num_key_value_heads, " (its key/value heads)"),
        "token_dim": (dim, shape.num_key_value_heads * shape.head_dim, " (key/value heads × head_dim)"),
    }
    problems = [
        f"{name}: the module has {got}, the base model has {want}{note}"
        for name, (got, want, note) in wanted.items()
        if got != want
    ]
    if problems:
        raise IncompatibleAdapter(
            f"the prefix was trained for a different base model ({shape.model_type} here): "
            + "; ".join(problems)
        )
    return layers * 2 * dim


def _check_prompt(config: dict[str, Any], shape: ModelShape) -> int:
    dim = _int_field(config, "token_dim")
    if dim != shape.hidden_size:
        raise IncompatibleAdapter(
            f"the soft prompt was trained for a different base model ({shape.model_type} here): "
            f"token_dim: the module has {dim}, the base model has {shape.hidden_size} (its hidden size)"
        )
    return dim


def _expect_tensors(shapes: dict[str, Dims], expected: dict[str, Dims]) -> None:
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise IncompatibleAdapter(f"{WEIGHTS_FILE} lacks tensor(s) {_names(missing)}")
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise IncompatibleAdapter(f"{WEIGHTS_FILE} has unexpected tensor(s) {_names(extra)}")
    for name, want in expected.items():
        if shapes[name] != want:
            raise IncompatibleAdapter(
                f"{WEIGHTS_FILE}: {name} has shape {list(shapes[name])}, "
                f"expected {list(want)} from the config and the base model"
            )


def _check_lora_config(config: dict[str, Any]) -> None:
    for name, feature in _LORA_FEATURES.items():
        if config.get(name):
            raise IncompatibleAdapter(f"the LoRA module uses {feature}, which plugboard does not support")
    bias = config.get("bias", "none")
    if bias != "none":
        raise IncompatibleAdapter(
            f"the LoRA module trains bias terms (bias={bias!r}), which plugboard does not support; "
            'train with bias="none"'
        )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(_BASE_REWRITING_INITS):
        raise IncompatibleAdapter(
            f"the LoRA module was initialised with {init!r} (init_lora_weights), which rewrites the base "
            "weights, so it only works on that rewritten model; convert it to plain LoRA with "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...)"
        )


def _check_lora(
    config: dict[str, Any], shapes: dict[str, Dims], shape: ModelShape, limits: AdapterLimits
) -> dict[str, LoraLayout]:
    _check_lora_config(config)
    pairs: dict[str, dict[str, str]] = {}
    unexpected: list[str] = []
    for key in sorted(shapes):
        for marker, feature in _LORA_TENSORS.items():
            if marker in key:
                raise IncompatibleAdapter(f"the LoRA module has {feature} ({key}); that is not supported")
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            unexpected.append(key)
            continue
        part = pairs.setdefault(match["path"], {})
        if match["part"] in part:
            raise IncompatibleAdapter(f"{WEIGHTS_FILE} has two lora_{match['part']} for {match['path']}")
        part[match["part"]] = key
    # Before unexpected tensors: a LoRA on lm_head also saves the layer's full weight (save_embedding_layers).
    foreign = [
        f"{path} ({_not_linear_reason(path)})" for path in sorted(pairs) if path not in shape.linear_layers
    ]
    if foreign:
        raise IncompatibleAdapter(
            f"the LoRA module targets layers plugboard cannot adapt in this {shape.model_type} model: "
            f"{_names(foreign)}; only linear layers inside the transformer blocks can be adapted"
        )
    if unexpected:
        raise IncompatibleAdapter(f"{WEIGHTS_FILE} has unexpected tensor(s) {_names(unexpected)}")
    if not pairs:
        raise IncompatibleAdapter(f"{WEIGHTS_FILE} holds no LoRA tensors (lora_A / lora_B)")
    alpha = _number_field(config.get("lora_alpha", 8), "lora_alpha")
    patterns = _alpha_patterns(config)
    rslora = bool(config.get("use_rslora", False))
    layers: dict[str, LoraLayout] = {}
    for path, part in sorted(pairs.items()):
        rank = _check_pair(path, part, shapes, shape.linear_layers[path])
        if rank > limits.max_lora_rank:
            raise IncompatibleAdapter(
                f"LoRA rank {rank} (at {path}) is more than this server's limit of "
                f"{limits.max_lora_rank} (max_lora_rank)"
            )
        # rank_pattern needs nothing here: the rank each layer was built with is its tensors' rank.
        layer_alpha = patterns.get(_pattern_key(list(patterns), path), alpha)
        scaling = layer_alpha / math.sqrt(rank) if rslora else layer_alpha / rank
        layers[path] = LoraLayout(part["A"], part["B"], rank, scaling)
    return layers


def _check_pair(path: str, part: dict[str, str], shapes: dict[str, Dims], dims: tuple[int, int]) -> int:
    """Validate one layer's lora_A [r, in] and lora_B [out, r]; return r."""
    for name in ("A", "B"):
        if name not in part:
            raise IncompatibleAdapter(f"{WEIGHTS_FILE} lacks lora_{name} for {path}")
    a, b = shapes[part["A"]], shapes[part["B"]]
    in_features, out_features = dims
    if len(a) != 2 or len(b) != 2 or a[0] < 1 or a[0] != b[1] or a[1] != in_features or b[0] != out_features:
        raise IncompatibleAdapter(
            f"{path}: lora_A has shape {list(a)} and lora_B {list(b)}; the base model's layer needs "
            f"[r, {in_features}] and [{out_features}, r] with the same r"
        )
    return a[0]


def _alpha_patterns(config: dict[str, Any]) -> dict[str, float]:
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise IncompatibleAdapter(f"{CONFIG_FILE}: alpha_pattern must be an object, found {patterns!r}")
    for key in patterns:
        try:
            re.compile(rf"(.*\.)?({key})$")
        except re.error as exc:
            raise IncompatibleAdapter(f"{CONFIG_FILE}: alpha_pattern key {key!r} is not a regex") from exc
    return {key: _number_field(value, f"alpha_pattern[{key!r}]") for key, value in patterns.items()}


def _pattern_key(pattern_keys: list[str], key_to_match: str) -> str:
    """PEFT's utils/other.py get_pattern_key: the first pattern that matches the end of the module path."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def _not_linear_reason(path: str) -> str:
    leaf = path.rsplit(".", 1)[-1]
    if leaf in ("lm_head", "embed_out", "score"):
        return "the output layer"
    if "embed" in leaf or leaf in ("wte", "wpe"):
        return "an embedding"
    return "not a linear layer of the base model"


def _names(names: list[str], show: int = 3) -> str:
    shown = ", ".join(names[:show])
    return f"{shown} and {len(names) - show} more" if len(names) > show else shown
