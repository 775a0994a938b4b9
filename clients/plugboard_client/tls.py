"""TLS for the clients: channel credentials from PEM files, shared by Client, AsyncClient and the CLI."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

PathLike = str | os.PathLike[str]


def channel_credentials(
    ca: PathLike | None = None, cert: PathLike | None = None, key: PathLike | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials: trust servers whose certificate `ca` (a PEM CA bundle) signed, or the system's
    roots when `ca` is None; `cert` and `key` (PEM) add a client certificate, for mutual TLS.

    Raises ValueError for a certificate without its key (or the reverse) and for unreadable files.
    """
    if (cert is None) != (key is None):
        raise ValueError("tls_cert and tls_key go together: give both (mutual TLS) or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(ca, "CA"),
        private_key=_read_pem(key, "key"),
        certificate_chain=_read_pem(cert, "certificate"),
    )


def channel_security(
    credentials: grpc.ChannelCredentials | None,
    options: Sequence[tuple[str, Any]] | None,
    *,
    tls: bool = False,
    tls_ca: PathLike | None = None,
    tls_cert: PathLike | None = None,
    tls_key: PathLike | None = None,
    tls_server_name: str | None = None,
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
    """The credentials (None: plaintext) and channel options a client's channel is built from.

    Any of `tls_ca`, `tls_cert`, `tls_key`, or `tls=True` (system roots) makes a TLS channel;
    `tls_server_name` checks the server's certificate for that name instead of the target's host.
    """
    opts = list(options or ())
    if tls or tls_ca is not None or tls_cert is not None or tls_key is not None:
        if credentials is not None:
            raise ValueError("give either credentials= or the tls options, not both")
        credentials = channel_credentials(tls_ca, tls_cert, tls_key)
    if tls_server_name is not None:
        if credentials is None:
            raise ValueError(
                "tls_server_name applies to TLS channels only (give tls_ca=, tls=True or credentials=)"
            )
        opts.append(("grpc.ssl_target_name_override", tls_server_name))
    return credentials, opts


def _read_pem(path: PathLike | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read the TLS {what} file {path}: {err.strerror or err}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"the TLS {what} file {path} is not PEM")
    return data
