"""The kernel netlink path for real: svmotion attach inside the lab guest, export migrated underneath.

Issue 5, item 3. This host's kernel has no nbd module, but the lab guest's (Debian's) has. The
guest boots with pyroot.img (Debian's Python + python3-pyroute2 + python3-click) and runs
guest/netlink_job.py: the project's own `agent.cli_attach attach` connects /dev/nbdX through the
`nbd` generic netlink family to the agent's nbdkit on the host (QEMU user network -> the VM's
TCP `listen` address, which the same nbdkit serves as its Unix socket), O_DIRECT writes of
known blocks go through it in rounds while the host runs `svmotion migrate`. Then nbdkit is
killed (SIGKILL, by PID): the agent restarts it, the kernel holds the guest's IO on the dead
connection, and `attach` run again hands the kernel a fresh socket (NBD_CMD_RECONFIGURE), so
the writes resume without an error. Finally the guest reads everything back and detaches
(twice: idempotent).
The host checks the destination image holds exactly the source plus the guest's last writes.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[2]
GUEST_DIR = Path(__file__).parent / "guest"
AGENT_FILES = ("__init__.py", "attach.py", "nbd_netlink.py", "errors.py", "cli_attach.py", "config.py")
SEED = 20240


def guest_job_module():
    spec = importlib.util.spec_from_file_location("netlink_job", GUEST_DIR / "netlink_job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_source(path: Path, size: int) -> bytes:
    """Random data in the first quarter (so the bulk copy has work), holes after it."""
    import random
    head = random.Random(SEED).randbytes(size // 4)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return head + bytes(size - len(head))


def restarted(agent, old_pid: int) -> bool:
    vm = agent.call("status")["vms"][0]
    return vm.get("nbdkit_up", True) and vm["nbdkit_pid"] not in (None, old_pid) and agent.nbd_socket.exists()


def last_round(lines: list[str]) -> int:
    return max((int(m.group(1)) for line in lines if (m := re.match(r"^ROUND (\d+)$", line))), default=0)


def test_netlink_attach_in_guest_while_the_export_migrates(tmp_path: Path, kernel_agent, guests,
                                                           lab_images_python) -> None:
    job_mod = guest_job_module()
    size = 32 * MiB
    expected = bytearray(make_source(tmp_path / "disk0.raw", size))
    agent = kernel_agent({"disk0": tmp_path / "disk0.raw"}, listen=True)
    uri = f"nbd://10.0.2.2:{agent.port}/disk0"
    config = {"vm": "vm1", "disk": "disk0", "uri": uri, "slots": size // job_mod.BLOCK, "per_round": 4,
              "seed": SEED, "min_rounds": 3, "pause": 0.05}
    job = {"run.sh": (GUEST_DIR / "netlink_run.sh").read_text(),
           "netlink_job.py": (GUEST_DIR / "netlink_job.py").read_text(),
           "config.json": json.dumps(config)}
    job.update({f"agent/{name}": (ROOT / "agent" / name).read_text() for name in AGENT_FILES})
    guest = guests(lab_images_python, job, python=True, net=True)

    first = guest.wait_for(r"^(ROUND 2|NBD-MODULE-MISSING|NO-PYROOT|SVMOTION-JOB-EXIT \d+)$", timeout=150)
    if first.group(1) == "NBD-MODULE-MISSING":
        pytest.skip(f"the lab guest's kernel ({lab_images_python.kernel_release}) has no nbd module")
    assert first.group(1) == "ROUND 2", guest.console_tail()
    console = "\n".join(guest.lines)
    assert re.search(r"^ATTACHED /dev/nbd\d+ netlink 33554432$", console, re.M), console
    assert "IDEMPOTENT yes" in console and f"BACKEND {uri}" in console, console

    dest = tmp_path / "dest"
    dest.mkdir()
    record = agent.migrate(dest, "--rate", "4M")
    at_switchover = last_round(guest.lines)
    print(f"guest rounds at migration start 2, at switchover {at_switchover}; "
          f"stuns {[round(s.get('duration_seconds') or 0, 4) for s in record['stuns']]}")
    guest.wait_for(rf"^ROUND {at_switchover + 3}$", timeout=90)      # through the destination now

    # nbdkit dies; the agent restarts it (on the destination); `attach` again revives the device.
    old_pid = agent.call("status")["vms"][0]["nbdkit_pid"]
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not restarted(agent, old_pid):
        assert time.monotonic() < deadline, f"the agent did not restart nbdkit:\n{agent.log_text()}"
        time.sleep(0.1)
    at_kill = last_round(guest.lines)
    guest.send("reattach")
    reattached = guest.wait_for(r"^REATTACH-RC (\d+)(.*)$", timeout=90)
    assert reattached.group(1) == "0", reattached.group(2)
    guest.wait_for(rf"^ROUND {at_kill + 3}$", timeout=90)
    guest.send("stop")
    exit_code = guest.wait_exit(timeout=150)

    console = "\n".join(guest.lines)
    assert exit_code == 0, f"guest job failed ({exit_code}):\n{guest.console_tail()}"
    assert re.search(r"^VERIFIED \d+ blocks 0 bad$", console, re.M), console
    assert re.search(r"^DETACH-RC 0 /dev/nbd\d+: detached vm1/disk0", console, re.M), console
    assert re.search(r"^DETACH-AGAIN-RC 0 .*not attached", console, re.M), console
    assert "AFTER-DETACH-BACKEND -" in console and "GUEST-IO-ERRORS" not in console
    assert at_switchover > 2, "the guest wrote nothing while the export migrated"
    dead = re.search(r"^DEAD-CONNECTION-EVENTS (\d+)$", console, re.M)
    assert dead and int(dead.group(1)) >= 1, "the kernel never saw its connection die: the kill proved nothing"

    # What the guest wrote landed host-side, on the destination, and nothing else changed.
    block = job_mod.BLOCK
    for line in guest.lines:
        if m := re.match(r"^BLOCK (\d+) (\d+)$", line):
            slot, rnd = int(m.group(1)), int(m.group(2))
            expected[slot * block:(slot + 1) * block] = job_mod.content(SEED, rnd, slot)
    target = Path(record["disks"][0]["dest"])
    assert target.read_bytes() == bytes(expected)
