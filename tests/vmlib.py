"""A VM on disk served by a real agent: sparse pattern disks, their pristine copies, sidecars, an nvram.

A plain module (tests/agent/conftest.py's `agent_vm` and the remote tests build VMs with it).
Disks are sparse: pattern data in a few extents, holes elsewhere; a pristine copy is the
writer's `initial` model, so a verification covers holes and data alike. Every disk has one
sidecar and the VM one per-VM file (an nvram), so FileCreate and the sidecar copy have work.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentproc import AgentPool, AgentProcess

from svlab.writer import VerifyingWriter, fill_pattern_image

MiB = 1024 * 1024


@dataclass
class AgentVM(AgentProcess):
    """A VM described by a config file, and the agent process serving it."""

    pristine: dict[str, Path] = field(default_factory=dict)   # disk -> untouched copy of the source

    def writer(self, **kwargs: Any) -> VerifyingWriter:
        """A verifying writer on every disk, its model starting from the pristine copies."""
        opts: dict[str, Any] = dict(connections=2, queue_depth=4, rate=2 * MiB, seed=1234,
                                    initial={d: str(p) for d, p in self.pristine.items()})
        opts.update(kwargs)
        return VerifyingWriter({d: self.uri(d) for d in self.disks}, **opts)


def make_disk(path: Path, name: str, size: int) -> None:
    """A sparse disk: pattern data in the first eighth and in a few extents further on."""
    step = size // 8
    extents = [(0, step), (3 * step, step // 2), (6 * step + step // 2, step // 4)]
    fill_pattern_image(path, name, size, extents)


def make_vm(pool: AgentPool, tmp_path: Path, n_disks: int = 1, size: int = 32 * MiB, start: bool = True,
            inject: str | None = None, lease: float | None = None, listen: str | None = None,
            extra_config: str = "", files: bool = True, command_prefix: list[str] | None = None) -> AgentVM:
    """A VM of `n_disks` sparse disks under tmp_path/srcN and its agent (added to `pool`, started);
    `files`: each disk with a sidecar and the VM with an nvram; `command_prefix`: run the agent (and
    so its nbdkit) under it, e.g. on a host of a netns lab (svlab/netns.py `Host.argv([])`)."""
    n = len(pool.agents)
    src = tmp_path / f"src{n}"
    src.mkdir()
    state = pool.state_dir("sva-")
    disks, pristine, sidecars = {}, {}, {}
    for i in range(n_disks):
        name = f"disk{i}"
        disks[name] = src / f"{name}.raw"
        make_disk(disks[name], name, size)
        pristine[name] = tmp_path / f"pristine{n}-{name}.raw"
        subprocess.run(["cp", "--sparse=always", str(disks[name]), str(pristine[name])], check=True)
        if files:
            sidecars[name] = [src / f"{name}.ctk"]
            sidecars[name][0].write_bytes(os.urandom(4096))
    nvram = [src / "vm1.nvram"] if files else []
    for f in nvram:
        f.write_bytes(os.urandom(8192))
    vm = AgentVM(root=tmp_path, state=state, disks=disks, name="vm1", config=tmp_path / f"agent{n}.toml",
                 sidecars=sidecars, files=nvram, lease=lease or None, listen=listen, pristine=pristine,
                 extra_config=extra_config, command_prefix=command_prefix or [])
    vm.write_config()
    pool.add(vm)
    if start:
        vm.start(inject)
    return vm
