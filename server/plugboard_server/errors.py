"""Domain errors shared by the engine, models, adapters and registry.

The service layer maps each class to one gRPC status code (service/errors.py); nothing below the
service knows about status codes.
"""

from __future__ import annotations


class PlugboardError(Exception):
    """Base class of every error plugboard reports to a caller."""


class InvalidRequest(PlugboardError):
    """The request itself is wrong (bad field value, missing input, too long)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class AdapterNotFound(PlugboardError):
    """No module, version or alias by that name."""


class IncompatibleAdapter(PlugboardError):
    """A module that does not fit the base model (or uses something plugboard does not support)."""


class CorruptModule(IncompatibleAdapter):
    """A stored version whose files no longer match the registry's checksums (changed, or missing)."""


class Overloaded(PlugboardError):
    """The server cannot take the request now; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotReady(PlugboardError):
    """The server is starting (model not loaded yet) or draining."""


class StorageError(PlugboardError):
    """The registry's disk refused a write (an I/O error, a read-only filesystem, permissions)."""


class StorageFull(StorageError):
    """The registry's disk, or the quota on it, is full: nothing was stored."""


class RegistryUnavailable(PlugboardError):
    """The registry's object store cannot be reached, or is throttling: a retry may succeed."""


class ModelLoadError(PlugboardError):
    """The base model could not be found or loaded."""
