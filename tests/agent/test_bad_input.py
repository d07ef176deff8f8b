"""Item 6: bad input gets one clear line and a documented exit code, and changes nothing."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[2]


def snapshot(vm, *dirs: Path) -> dict:
    """What must not change: files in the directories (name, size, mtime), the plugin's disks, no migration."""
    files = {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for d in dirs for p in sorted(d.iterdir())}
    disks = {n: (d["state"], d["path"], d["dest"]) for n, d in vm.plugin("status")["disks"].items()}
    st = vm.status()
    return {"files": files, "disks": disks, "migration": st["migration"], "last": st["last"]}


def refused(done: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, done.stdout + done.stderr
    assert len(lines) == 1 and lines[0].startswith("svmotion: error: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_refusals_change_nothing(agent_vm, dest_dir: Path, small_tmpfs) -> None:
    vm = agent_vm(n_disks=2)
    src = next(iter(vm.disks.values())).parent
    (dest_dir / "disk1.raw").write_bytes(b"keep me")
    tiny = small_tmpfs(1 * MiB)
    empty = dest_dir.parent / "empty"
    empty.mkdir()
    before = snapshot(vm, src, dest_dir, tiny, empty)
    cases = [
        (["migrate", "vm9", "--dest", str(empty)], 3, ["unknown VM 'vm9'", "vm1"]),
        (["migrate", vm.name, "--dest", str(src)], 3, ["is the directory of the source disk"]),
        (["migrate", vm.name, "--dest", str(dest_dir)], 3, [str(dest_dir / "disk1.raw"), "already exists"]),
        (["migrate", vm.name, "--dest", str(tiny)], 3, [str(tiny), "free", "choose another --dest"]),
        (["migrate", vm.name, "--dest", str(empty / "nope")], 3, ["is not a directory", "mkdir"]),
        (["migrate", vm.name, "--dest", str(empty), "--rate", "fast"], 2, ["'fast'", "50M"]),
        (["migrate", vm.name, "--dest", str(empty), "--granularity", "3000"], 2, ["'3000'", "power of two"]),
        (["migrate", vm.name, "--dest", str(empty), "--stun-budget", "1h"], 2, ["'1h'", "50ms"]),
        (["abort", "vm9"], 3, ["unknown VM 'vm9'"]),
    ]
    for args, code, words in cases:
        done = vm.cli(*args)
        if code == 2:     # click's usage errors: the usage lines, then one "Error:" line
            assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("Error: ")
            assert all(w in done.stderr for w in words), done.stderr
        else:
            refused(done, code, *words)
    assert snapshot(vm, src, dest_dir, tiny, empty) == before
    assert (dest_dir / "disk1.raw").read_bytes() == b"keep me"


def test_missing_source_file(agent_vm, dest_dir: Path) -> None:
    vm = agent_vm(n_disks=1)
    vm.files[0].unlink()
    refused(vm.cli("migrate", vm.name, "--dest", str(dest_dir)), 3, str(vm.files[0]), "missing")
    vm.sidecars["disk0"][0].unlink()
    vm.files[0].write_bytes(b"back")
    refused(vm.cli("migrate", vm.name, "--dest", str(dest_dir)), 3, str(vm.sidecars["disk0"][0]), "missing")
    assert list(dest_dir.iterdir()) == []


def test_second_migration_while_migrating(agent_vm, dest_dir: Path, tmp_path: Path) -> None:
    vm = agent_vm(n_disks=1, inject="pause:DiskCopy")
    other = tmp_path / "other"
    other.mkdir()
    assert vm.cli("migrate", vm.name, "--dest", str(dest_dir), "--no-wait").returncode == 0
    vm.wait_phase("DiskCopy")
    refused(vm.cli("migrate", vm.name, "--dest", str(other)), 3, "already migrating", "svmotion abort vm1")
    assert list(other.iterdir()) == []
    assert vm.cli("abort", vm.name).returncode == 0


def test_agent_unreachable(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "agent.cli", "--agent-socket", str(tmp_path / "no.sock"),
                           "status"], cwd=ROOT, capture_output=True, text=True)
    refused(done, 4, "cannot reach the agent", str(tmp_path / "no.sock"))


@pytest.mark.parametrize("mutate, words", [
    (lambda t: t.replace("[[vm.disk]]", "[[vm.disks]]", 1), ["unknown key 'disks'"]),
    (lambda t: t + "\n[agent\n", ["not valid TOML"]),
    (lambda t: t.replace('metrics = "127.0.0.1:0"', 'metrics = "localhost"'), ["'localhost'", "host:port"]),
    (lambda t: t.replace("disk0.raw", "gone.raw"), ["gone.raw", "does not exist"]),
])
def test_bad_config_file(agent_vm, mutate, words: list[str]) -> None:
    """`svmotion agent` with a bad config: exit 7, one line naming the value; nothing started."""
    vm = agent_vm(n_disks=1, start=False)
    vm.config.write_text(mutate(vm.config.read_text()))
    done = subprocess.run([sys.executable, "-m", "agent.cli", "agent", "--config", str(vm.config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    refused(done, 7, str(vm.config), *words)
    assert vm.nbdkit_pid() is None and not vm.socket.exists()
