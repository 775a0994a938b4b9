"""A local S3-compatible server for the object-store registry's tests: moto's, on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# moto accepts any credentials; boto3 insists on having some.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "plugboard-test",
    "AWS_SECRET_ACCESS_KEY": "plugboard-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def s3_server() -> Iterator[str]:
    """Start moto's S3 server on a free loopback port -> its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def client(endpoint: str) -> Any:
    """A client the way the server makes one, for tests that look at or tamper with the bucket."""
    from plugboard_server.registry._s3client import make_client

    for key, value in CREDENTIALS.items():
        os.environ.setdefault(key, value)
    return make_client(endpoint)


def new_bucket(endpoint: str) -> str:
    name = f"plugboard-{secrets.token_hex(6)}"
    client(endpoint).create_bucket(Bucket=name)
    return name
