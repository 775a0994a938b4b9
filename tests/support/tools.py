"""What tests that run real programs share: a free port, and a tool that must be there under CI."""

from __future__ import annotations

import os
import socket
from typing import NoReturn

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_tool(reason: str) -> NoReturn:
    """A program a test needs is not installed: fail under CI (which installs it), skip elsewhere."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(reason)
    pytest.skip(reason)
