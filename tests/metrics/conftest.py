"""Fixtures of the metrics tests: a fresh metrics registry and a served /metrics."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # promlab.py, promql.py next to the tests

from agent import metrics  # noqa: E402


@pytest.fixture
def registry():
    """A fresh metrics registry for one test (the module functions write to it)."""
    yield metrics.reset()
    metrics.reset()


@pytest.fixture
def served(registry) -> Iterator[str]:
    """metrics.serve on a free loopback port; yields the /metrics URL."""
    server = metrics.serve("127.0.0.1:0")
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()


