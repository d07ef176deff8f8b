"""The agent supervises nbdkit (restarts a dead one) and exports the migration's metrics."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbd
from agentproc import free_tcp_port

from agent.supervisor import process_start_time
from svlab.writer import VerifyingWriter

MiB = 1 << 20


def test_dead_nbdkit_is_restarted_on_current_paths(agent_vm) -> None:
    vm = agent_vm(n_disks=1)
    pid = vm.nbdkit_pid()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        st = vm.status()
        if st["nbdkit_up"] and st["nbdkit_pid"] not in (None, pid):
            try:
                if vm.plugin("hello")["pid"] == st["nbdkit_pid"]:
                    break
            except OSError:
                pass            # restarting: the control socket is not bound yet
        time.sleep(0.1)
    else:
        raise AssertionError(f"nbdkit not restarted: {vm.status()}\n{vm.log_text()}")
    assert process_start_time(pid) is None
    assert vm.plugin("hello")["disks"][0]["path"] == str(vm.disks["disk0"])
    assert "exited" in vm.log_text()


def test_metrics_after_migration(agent_vm, dest_dir: Path) -> None:
    vm = agent_vm(n_disks=1)
    done = vm.cli("migrate", vm.name, "--dest", str(dest_dir))
    assert done.returncode == 0, done.stderr
    port = re.search(r"serving http://127\.0\.0\.1:(\d+)/metrics", vm.log_text()).group(1)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for kind in ("mirror_install", "switchover"):
        assert re.search(rf'svmotion_stun_duration_seconds_count{{kind="{kind}",strategy="optimized",'
                         rf'vm="vm1"}} 1\.0', text), kind
    assert re.search(r'svmotion_migrations_total{result="success",vm="vm1"} 1\.0', text)
    assert re.search(r'svmotion_phase_duration_seconds_count{phase="DiskCopy",vm="vm1"} 1\.0', text)
    assert re.search(r'svmotion_nbdkit_up{vm="vm1"} 1\.0', text)
    assert re.search(r'svmotion_copied_bytes_total{disk="disk0",kind="bulk",vm="vm1"} [1-9]', text)


def test_bad_injection_is_refused(agent_vm) -> None:
    vm = agent_vm(n_disks=1, start=False)
    env = dict(os.environ, SVMOTION_INJECT="hold:Nowhere=1")
    done = subprocess.run([sys.executable, "-m", "agent.cli", "agent", "--config", str(vm.config)],
                          cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2 and "hold:Nowhere=1" in done.stderr and "SVMOTION_INJECT" in done.stderr
    assert vm.nbdkit_pid() is None


def test_nbdkit_dying_mid_migration_fails_it_and_rolls_back(agent_vm, dest_dir: Path) -> None:
    """The VM goes back to its source; the partial disk stays, with its identity record, for the
    next migration to resume (tests/agent/test_resume.py); per-VM files and sidecars are removed."""
    vm = agent_vm(n_disks=1, inject="pause:DiskCopy")
    migrate = vm.cli_background("migrate", vm.name, "--dest", str(dest_dir))
    vm.wait_phase("DiskCopy")
    os.kill(vm.nbdkit_pid(), signal.SIGKILL)
    out, err = migrate.communicate(timeout=60)
    assert migrate.returncode == 5, out + err
    assert "nbdkit exited" in err
    assert sorted(p.name for p in dest_dir.iterdir()) == ["disk0.raw.svmotion-partial",
                                                          "disk0.raw.svmotion-partial.json"]
    deadline = time.monotonic() + 15
    while not vm.status()["nbdkit_up"]:
        assert time.monotonic() < deadline, vm.log_text()
        time.sleep(0.1)


def test_nbdkit_dying_during_a_copy_pass_is_reported_as_nbdkit_exiting(agent_vm, dest_dir: Path) -> None:
    """Defect 6 of issue 10: the CLI printed a raw BrokenPipeError when nbdkit died under a running pass."""
    vm = agent_vm(n_disks=1)
    migrate = vm.cli_background("migrate", vm.name, "--dest", str(dest_dir), "--rate", "2M")
    vm.wait_phase("DiskCopy")
    time.sleep(0.3)                  # the agent is polling the pass's status now
    os.kill(vm.nbdkit_pid(), signal.SIGKILL)
    out, err = migrate.communicate(timeout=60)
    assert migrate.returncode == 5, out + err
    assert "nbdkit exited" in err, err
    for raw in ("BrokenPipeError", "ConnectionResetError", "ConnectionError", "Errno"):
        assert raw not in err, err


def test_vm_with_tcp_listen_serves_unix_and_tcp_through_a_migration(agent_vm, dest_dir: Path) -> None:
    """nbdkit takes -U or -p, not both: the supervisor hands it both listeners by socket activation."""
    port = free_tcp_port()
    vm = agent_vm(n_disks=1, listen=f"127.0.0.1:{port}")
    tcp_uri = f"nbd://127.0.0.1:{port}/disk0"
    writer = VerifyingWriter({"disk0": tcp_uri}, connections=2, queue_depth=4, rate=2 * MiB, seed=7,
                             initial={"disk0": str(vm.pristine["disk0"])})
    writer.start()
    try:
        done = vm.cli("migrate", vm.name, "--dest", str(dest_dir))
        assert done.returncode == 0, done.stderr
    finally:
        report = writer.stop()
    assert report.writes > 0 and not report.errors, report.errors[:3]
    assert writer.verify_image("disk0", str(dest_dir / "disk0.raw")) == []
    for uri in (tcp_uri, vm.uri("disk0")):
        h = nbd.NBD()
        h.connect_uri(uri)
        try:
            assert h.get_size() == os.path.getsize(dest_dir / "disk0.raw"), uri
        finally:
            h.shutdown()
