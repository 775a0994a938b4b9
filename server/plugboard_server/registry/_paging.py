"""Page tokens of ListAdapters, and paging a list of versions in memory (for stores without SQL).

Keyset paging: a token is the last (name, version) of the previous page, so a page never repeats or
skips a version that existed across both calls, whatever was published or deleted in between.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable

from plugboard_server.errors import InvalidRequest
from plugboard_server.registry.store import NAME_PATTERN, ModuleVersion

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100


def encode_token(name: str, version: int) -> str:
    return base64.urlsafe_b64encode(json.dumps([name, version]).encode()).decode()


def decode_token(token: str) -> tuple[str, int]:
    try:
        name, version = json.loads(base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True))
        # Only what a previous page can have produced: a valid name, a version SQLite can hold.
        if (
            isinstance(name, str)
            and NAME_PATTERN.fullmatch(name)
            and type(version) is int
            and 0 <= version < 2**63
        ):
            return name, version
    except (UnicodeError, binascii.Error, ValueError, TypeError):
        pass
    raise InvalidRequest(
        "malformed page token; pass back the next_page_token of the previous page", "page_token"
    )


def page_size_of(page_size: int) -> int:
    return DEFAULT_PAGE_SIZE if page_size <= 0 else min(page_size, MAX_PAGE_SIZE)


def page_in_memory(
    versions: Iterable[ModuleVersion],
    *,
    page_size: int,
    page_token: str,
    kind: str,
    tag: str,
    name_prefix: str,
    all_versions: bool,
) -> tuple[list[ModuleVersion], str]:
    """One page of `versions` in (name, version) order, with ListAdapters' filters.

    Without all_versions, only each module's latest version is a candidate, shown if it matches the
    filters (an older version that matches does not stand in for it), as in the SQLite index.
    """
    size = page_size_of(page_size)
    after = decode_token(page_token) if page_token else ("", 0)
    ordered = sorted(versions, key=lambda v: (v.name, v.version))
    if not all_versions:
        latest = {v.name: v for v in ordered}  # the last one of each name wins
        ordered = [v for v in ordered if latest[v.name] is v]
    picked = [
        v
        for v in ordered
        if (v.name, v.version) > after
        and (not kind or v.facts.kind == kind)
        and (not tag or tag in v.tags)
        and v.name.startswith(name_prefix)
    ]
    page = picked[:size]
    token = encode_token(page[-1].name, page[-1].version) if len(picked) > size else ""
    return page, token
