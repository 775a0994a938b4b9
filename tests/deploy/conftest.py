"""Fixtures of the deploy/ tests."""

from __future__ import annotations

from collections.abc import Iterator

import helm_python as helm
import pytest

from tests.deploy.helm_support import CHART_DIR


@pytest.fixture(scope="session")
def chart() -> Iterator[helm.Chart]:
    """The chart loaded once (loading parses every template)."""
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded
