"""Fixtures of the lab tests: one namespace lab per module, brought up by the real CLI.

Design notes
- `nslab` runs `python -m agent.cli lab --dir DIR up` (the command a user runs) in a short
  directory under /tmp, and gives the tests the lab as svlab/nslab.py records it (`load`):
  its hosts (svlab/netns.py), each host's root directory, the units' PIDs.
- Bringing the lab up is the expensive part (provisioning three hosts, booting the guest), so
  the tests of a module share one lab, in file order; the last one takes it down and checks
  what is left. The finalizer takes it down whatever happened (by PID, through `lab down`).
- Needs root (namespaces), QEMU, nbdkit and Prometheus; a missing piece is a skip that says
  which (the guest's images are built on first use, with network, as the kernel tests do).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
from labtest import lab_cli

from svlab import lab as guest_lab
from svlab import nslab as nslab_mod


def require_lab_host() -> None:
    if os.geteuid() != 0:
        pytest.skip("the namespace lab needs root (network namespaces)")
    for tool, pkg in (("nbdkit", "nbdkit"), ("prometheus", "prometheus"), ("rsync", "rsync"),
                      ("qemu-system-x86_64", "qemu-system-x86")):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed: run `make setup` (Debian package {pkg})")
    try:
        guest_lab.check_host()
    except guest_lab.LabError as err:
        pytest.skip(f"the lab's guest cannot run here: {err}")


@pytest.fixture(scope="module")
def nslab() -> Iterator[nslab_mod.NsLab]:
    require_lab_host()
    labdir = Path(tempfile.mkdtemp(prefix="svl-", dir="/tmp"))
    try:
        done = lab_cli(labdir, "up")
        assert done.returncode == 0, done.stdout + done.stderr
        yield nslab_mod.load(labdir)
    finally:
        if (labdir / "state.json").exists():
            down = lab_cli(labdir, "down")
            assert down.returncode == 0, down.stdout + down.stderr
        shutil.rmtree(labdir, ignore_errors=True)
