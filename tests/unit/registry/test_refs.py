from __future__ import annotations

import pytest

from plugboard_server.errors import InvalidRequest
from plugboard_server.registry.store import check_alias, parse_ref


@pytest.mark.parametrize(
    ("ref", "parsed"),
    [("sentiment", ("sentiment", "latest")), ("qa.v2@7", ("qa.v2", "7")), ("x@stable", ("x", "stable"))],
)
def test_refs(ref, parsed):
    assert parse_ref(ref) == parsed


@pytest.mark.parametrize("ref", ["", "@1", "a b", "x@", "../etc", "a/b", "x@y@z", "é", "Upper", "x" * 65])
def test_malformed_refs(ref):
    with pytest.raises(InvalidRequest):
        parse_ref(ref)


@pytest.mark.parametrize("alias", ["latest", "7", "", "Stable", "a/b"])
def test_bad_aliases(alias):
    with pytest.raises(InvalidRequest):
        check_alias(alias)
