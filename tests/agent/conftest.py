"""Fixtures for agent tests: a VM on disk, a real agent process (which starts a real nbdkit), the CLI.

The agent process itself (config, start, API, CLI, stop by PID) is tests/agentproc.py's, shared
with the kernel and live metrics tests; the VM on disk around it is tests/vmlib.py's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest
from agentproc import AgentPool
from vmlib import AgentVM, make_vm


@pytest.fixture
def agent_vm(tmp_path: Path) -> Iterator[Callable[..., AgentVM]]:
    """Factory: `agent_vm(n_disks=1, size=32*MiB, start=True, inject=None)` -> AgentVM; all stopped after."""
    pool = AgentPool()
    try:
        yield lambda **kwargs: make_vm(pool, tmp_path, **kwargs)
    finally:
        pool.close()


@pytest.fixture
def dest_dir(tmp_path: Path) -> Path:
    d = tmp_path / "dest"
    d.mkdir()
    return d

