"""Defaults of the object-store registry, importable without boto3 (the server's flags show them)."""

REFRESH_S = 1.0  # how stale an in-memory copy of a module's index may get before it is re-read
CACHE_BYTES = 20 << 30  # the local download cache's budget
ORPHAN_MIN_AGE_S = 3600.0  # objects no index names are removed only once this old
