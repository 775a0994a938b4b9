"""ServerConfig: every setting of the server, from command-line flags or PLUGBOARD_* environment variables.

Each field becomes a flag (`--max-batch-size`) and an environment variable (`PLUGBOARD_MAX_BATCH_SIZE`);
a flag wins over the variable, the variable over the default.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from plugboard_server.engine.config import EngineConfig
from plugboard_server.registry.s3_defaults import CACHE_BYTES, REFRESH_S

_ENGINE_DEFAULTS = EngineConfig()


def _opt(help: str, default: Any = MISSING, *, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class ServerConfig:
    model: str = _opt(
        "model: 'default' (the embedded SmolLM2-135M-Instruct), a directory, a .gguf file, "
        "or a Hugging Face id already in the local cache",
        "default",
    )
    registry: str = _opt(
        "the registry: a directory (shared by replicas on one filesystem) or s3://bucket/prefix (an "
        "S3-compatible object store, for replicas that share no filesystem; credentials from the usual "
        "AWS_* variables, profile or role)",
        "var/registry",
    )
    registry_endpoint_url: str = _opt(
        "an s3:// registry's endpoint, for S3-compatible stores (MinIO, Ceph, R2, ...); "
        "empty: AWS S3, or $AWS_ENDPOINT_URL",
        "",
    )
    registry_cache_dir: Path | None = _opt(
        "where versions downloaded from an s3:// registry are kept (default: <cache dir>/registry)", None
    )
    registry_cache_bytes: int = _opt(
        "budget of that download cache; the least recently used versions leave beyond it", CACHE_BYTES
    )
    registry_refresh_s: float = _opt(
        "an s3:// registry: how many seconds what 'latest' and aliases mean may lag a publish made by "
        "another replica (a new version itself is seen at once)",
        REFRESH_S,
    )
    adapters_dir: Path | None = _opt(
        "import the PEFT modules in this directory into the registry at start, one subdirectory per module "
        "(named by it); unchanged modules are not imported again",
        None,
    )
    admin_token_file: Path | None = _opt(
        "file holding the bearer token the admin RPCs (register, delete, alias, load, unload) require", None
    )
    inference_token_file: Path | None = _opt(
        "file holding the bearer token every other plugboard RPC then requires: Generation and the read-only "
        "Adapters RPCs (list, get); the admin token is accepted there too. Health and reflection stay open",
        None,
    )
    tls_cert: Path | None = _opt("PEM server certificate chain: serve TLS (needs --tls-key)", None)
    tls_key: Path | None = _opt("PEM private key of --tls-cert", None)
    tls_client_ca: Path | None = _opt(
        "PEM CA bundle: clients must present a certificate signed by it (mutual TLS; needs --tls-cert)", None
    )
    host: str = _opt("address the gRPC server binds", "127.0.0.1")
    port: int = _opt("gRPC port (0 picks a free one)", 50051)
    metrics_host: str = _opt("address the Prometheus /metrics endpoint binds", "127.0.0.1")
    metrics_port: int = _opt("Prometheus /metrics port (0 picks a free one, -1 turns it off)", 9400)
    dtype: str = _opt(
        "weights and activations dtype", "auto", choices=("auto", "float32", "bfloat16", "float16")
    )
    device: str = _opt("device: auto, cpu, cuda or cuda:N", "auto")
    quantize: str = _opt(
        "load the weights quantized by bitsandbytes", "none", choices=("none", "int8", "nf4")
    )
    cache_dir: Path | None = _opt(
        "where converted models are cached (default: $PLUGBOARD_CACHE_DIR or ~/.cache/plugboard)", None
    )
    threads: int = _opt("torch intra-op threads (0 = torch's default)", 0)
    max_batch_size: int = _opt("most requests in the running batch", _ENGINE_DEFAULTS.max_batch_size)
    max_batch_tokens: int = _opt(
        "token budget of the running batch (prompt + max_new_tokens per row)",
        _ENGINE_DEFAULTS.max_batch_tokens,
    )
    max_prefill_tokens: int = _opt("most padded tokens in one prefill", _ENGINE_DEFAULTS.max_prefill_tokens)
    max_queued_requests: int = _opt(
        "most requests waiting; beyond it RESOURCE_EXHAUSTED", _ENGINE_DEFAULTS.max_queued_requests
    )
    max_queued_tokens: int = _opt(
        "token budget of the waiting requests (prompt + max_new_tokens each); beyond it RESOURCE_EXHAUSTED",
        _ENGINE_DEFAULTS.max_queued_tokens,
    )
    max_input_tokens: int = _opt(
        "longest prompt in tokens (0 = the model's context - 1)", _ENGINE_DEFAULTS.max_input_tokens
    )
    max_new_tokens: int = _opt(
        "the most max_new_tokens a request may ask for", _ENGINE_DEFAULTS.max_new_tokens
    )
    default_max_new_tokens: int = _opt(
        "max_new_tokens when a request leaves it unset", _ENGINE_DEFAULTS.default_max_new_tokens
    )
    max_stop_sequences: int = _opt("most stop sequences per request", _ENGINE_DEFAULTS.max_stop_sequences)
    max_loaded_adapters: int = _opt(
        "device slots for modules; a request whose module finds every slot busy waits",
        _ENGINE_DEFAULTS.max_loaded_adapters,
    )
    max_lora_rank: int = _opt(
        "largest LoRA rank served (the slot buffers are this wide)", _ENGINE_DEFAULTS.max_lora_rank
    )
    max_prefix_tokens: int = _opt(
        "most virtual tokens of a prefix or soft prompt", _ENGINE_DEFAULTS.max_prefix_tokens
    )
    max_host_adapters: int = _opt(
        "module versions kept in host memory (LRU)", _ENGINE_DEFAULTS.max_host_adapters
    )
    max_upload_bytes: int = _opt("largest module upload (RegisterAdapter), all files together", 1 << 30)
    top_adapters: int = _opt(
        "per-module metrics get their own label for this many names, the rest 'other'", 20
    )
    max_message_bytes: int = _opt("largest gRPC message received or sent", 4 * 1024 * 1024)
    max_concurrent_rpcs: int = _opt(
        "most RPCs in progress on the server at once (streams and uploads included); "
        "beyond it RESOURCE_EXHAUSTED",
        2048,
    )
    max_concurrent_streams: int = _opt("most concurrent HTTP/2 streams (calls) per client connection", 256)
    grace_period: float = _opt("seconds to finish in-flight requests after SIGTERM", 30.0)
    log_level: str = _opt("logging level", "info", choices=("debug", "info", "warning", "error"))

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_batch_size=self.max_batch_size,
            max_batch_tokens=self.max_batch_tokens,
            max_prefill_tokens=self.max_prefill_tokens,
            max_queued_requests=self.max_queued_requests,
            max_queued_tokens=self.max_queued_tokens,
            max_input_tokens=self.max_input_tokens,
            max_new_tokens=self.max_new_tokens,
            default_max_new_tokens=self.default_max_new_tokens,
            max_stop_sequences=self.max_stop_sequences,
            max_loaded_adapters=self.max_loaded_adapters,
            max_host_adapters=self.max_host_adapters,
            max_lora_rank=self.max_lora_rank,
            max_prefix_tokens=self.max_prefix_tokens,
        )

    def validate(self) -> None:
        for name in (
            "max_batch_size",
            "max_batch_tokens",
            "max_prefill_tokens",
            "max_queued_requests",
            "max_queued_tokens",
            "max_concurrent_rpcs",
            "max_concurrent_streams",
            "max_new_tokens",
            "default_max_new_tokens",
            "max_message_bytes",
            "max_loaded_adapters",
            "max_host_adapters",
            "max_upload_bytes",
            "max_lora_rank",
            "max_prefix_tokens",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if not 0 <= self.port <= 65535 or not -1 <= self.metrics_port <= 65535:
            raise ValueError("ports must lie in 0..65535")
        if self.registry_cache_bytes <= 0 or self.registry_refresh_s < 0:
            raise ValueError("--registry-cache-bytes must be positive, --registry-refresh-s not negative")
        if "://" in str(self.registry) and not str(self.registry).startswith("s3://"):
            raise ValueError(f"--registry {self.registry}: give a directory or s3://bucket/prefix")
        self._validate_security()

    def _validate_security(self) -> None:
        """TLS flags that go together, readable PEM files, usable and distinct tokens."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and b"-----BEGIN " not in _read_file(name, path):
                raise ValueError(f"--{name.replace('_', '-')} {path} is not a PEM file")
        tokens = {}
        for name in ("admin_token_file", "inference_token_file"):
            path = getattr(self, name)
            if path is None:
                continue
            token = _read_file(name, path).decode("utf-8", "replace").strip()
            if not token or not all(" " < c <= "~" for c in token):
                raise ValueError(
                    f"--{name.replace('_', '-')} {path} must hold one token: printable ASCII, no spaces"
                )
            tokens[name] = token
        if len(tokens) == 2 and tokens["admin_token_file"] == tokens["inference_token_file"]:
            raise ValueError("--admin-token-file and --inference-token-file hold the same token; use two")

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(
            prog="plugboard-server",
            description="Serve one frozen language model with per-request learned modules over gRPC.",
            epilog="Every flag can also be set by its environment variable, e.g. PLUGBOARD_PORT=50052.",
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        for f in fields(cls):
            env = f"PLUGBOARD_{f.name.upper()}"
            default = f.default
            kind = _field_type(f.type)
            if env in os.environ:
                default = kind(os.environ[env])
            p.add_argument(
                f"--{f.name.replace('_', '-')}",
                type=kind,
                default=default,
                choices=f.metadata.get("choices"),
                help=f"{f.metadata['help']} [env {env}]",
            )
        return p

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> ServerConfig:
        parser = cls.parser()
        config = cls(**vars(parser.parse_args(argv)))
        try:
            config.validate()
        except ValueError as exc:
            parser.error(str(exc))
        return config


def _read_file(name: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"--{name.replace('_', '-')}: cannot read {path}: {exc.strerror or exc}") from None


def _field_type(annotation: Any) -> type:
    text = str(annotation)
    for name, kind in (("Path", Path), ("float", float), ("int", int)):
        if text.startswith(name):
            return kind
    return str
