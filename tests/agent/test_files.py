"""Per-VM files and sidecars (invariant 8; issue 10, defect 4): the file mirror alone, then in migrations.

Design notes
- The file mirror (agent/files.py) is tested on real files in-process, through its `after_read`
  seam: the seam runs after the copy read a source and before the copy takes its identity
  again, so a test can change the file exactly inside the copy, every time.
- A change that no timestamp shows is made deterministic with a shared mapping on tmpfs
  (/dev/shm): after the first write through the mapping its page stays writable and dirty (tmpfs
  has no writeback), so later writes change no mtime, ctime or size. A check that trusted the
  stat identity would miss them; the tests assert the identity really stayed the same.
- The migrations run a real agent (tests/agent/conftest.py: one nvram per VM, one sidecar per
  disk), change the files at a chosen moment (SVMOTION_INJECT `hold:PHASE`; inside the cut's own
  read, with a fanotify read gate, tests/readgate.py) or all the time (a writer thread stamping
  a counter into them), and compare the destination with the source's content at the cut,
  which the migration record's `files_cut` step identifies (its sha256 per file and its
  wall-clock window).
"""
from __future__ import annotations

import hashlib
import mmap
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from readgate import ReadGate
from test_faults import assert_on_intact_source, dest_files

from agent.files import COPY_ATTEMPTS, FileMirror, FileMirrorError, FileUnstable, identity
from agent.phases import PHASES, SWITCHOVER_ATTEMPTS

MiB = 1024 * 1024
BEFORE_SWITCHOVER = PHASES[1:PHASES.index("DiskCopyDone")]


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A directory on tmpfs, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="svm-files-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Mapped:
    """A file written through a shared mapping; on tmpfs, writes after the first change no timestamp."""

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, os.path.getsize(path))
        self._map[:1] = self._map[:1]           # the first write: the page is writable and dirty now

    def write(self, data: bytes) -> None:
        assert len(data) == len(self._map)
        self._map[:] = data

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


def stat_id(path: Path) -> tuple[int, ...]:
    return identity(os.stat(path))


def mirror_of(*paths: Path, dest: Path, after_read=None) -> FileMirror:
    return FileMirror([(str(p), str(dest / p.name), "per-VM file") for p in paths], after_read=after_read)


def partial(dest: Path, source: Path) -> Path:
    return dest / f"{source.name}.svmotion-partial"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- the file mirror alone -----------------------------------------------------------------------

@pytest.fixture
def pair(shm_dir: Path) -> tuple[Path, Path]:
    """A source file (8 KiB) and a destination directory, on tmpfs."""
    (shm_dir / "src").mkdir()
    (shm_dir / "dst").mkdir()
    nvram = shm_dir / "src" / "vm1.nvram"
    nvram.write_bytes(os.urandom(8192))
    return nvram, shm_dir / "dst"


def test_copy_then_check_copies_only_what_changed(pair) -> None:
    nvram, dest = pair
    mirror = mirror_of(nvram, dest=dest)
    first = mirror.sync()
    assert first.record()["copied"] == 1 and partial(dest, nvram).read_bytes() == nvram.read_bytes()
    assert mirror.sync().record()["copied"] == 0
    nvram.write_bytes(b"v2\n")
    again = mirror.sync().record()
    assert again["copied"] == 1 and again["files"][0]["sha256"] == sha(b"v2\n")
    assert partial(dest, nvram).read_bytes() == b"v2\n"
    assert os.stat(partial(dest, nvram)).st_mode == os.stat(nvram).st_mode


def test_check_finds_a_change_no_timestamp_shows(pair) -> None:
    nvram, dest = pair
    mapped = Mapped(nvram)
    try:
        mirror = mirror_of(nvram, dest=dest)
        mirror.sync()
        before = stat_id(nvram)
        new = os.urandom(8192)
        mapped.write(new)
        assert stat_id(nvram) == before, "the scenario needs a write that leaves the identity as it was"
        assert mirror.sync().record()["copied"] == 1
    finally:
        mapped.close()
    assert partial(dest, nvram).read_bytes() == new


@pytest.mark.parametrize("how", ["write", "mmap"])
def test_a_write_racing_the_copy_is_copied_again(pair, how: str) -> None:
    """The seam rewrites the file once, between the copy's read and its second identity."""
    nvram, dest = pair
    new = os.urandom(8192)
    mapped = Mapped(nvram)
    races: list[tuple[int, ...]] = []

    def race(path: str) -> None:
        if not races:
            races.append(stat_id(nvram))
            mapped.write(new) if how == "mmap" else nvram.write_bytes(new)
            races.append(stat_id(nvram))

    try:
        sync = mirror_of(nvram, dest=dest, after_read=race).sync()
    finally:
        mapped.close()
    if how == "mmap":
        assert races[0] == races[1], "the scenario needs a write that leaves the identity as it was"
    assert sync.record()["files"] == [{"path": str(nvram), "sha256": sha(new), "bytes": 8192, "copies": 2}]
    assert not sync.unstable
    assert partial(dest, nvram).read_bytes() == new


def test_a_file_that_never_settles_is_unstable_and_its_partial_is_what_the_record_says(pair) -> None:
    nvram, dest = pair
    sync = mirror_of(nvram, dest=dest, after_read=lambda path: nvram.write_bytes(os.urandom(8192))).sync()
    record = sync.record()
    assert record["unstable"] == [str(nvram)] and record["files"][0]["copies"] == COPY_ATTEMPTS
    assert record["files"][0]["sha256"] == sha(partial(dest, nvram).read_bytes())
    with pytest.raises(FileUnstable, match="kept changing"):
        sync.raise_if_unstable()


@pytest.mark.parametrize("how", ["vanished", "directory", "vanished during the copy"])
def test_a_file_that_cannot_be_read_fails_with_its_name(pair, how: str) -> None:
    nvram, dest = pair
    after_read = (lambda path: nvram.unlink()) if how == "vanished during the copy" else None
    mirror = mirror_of(nvram, dest=dest, after_read=after_read)
    if after_read is None:
        mirror.sync()
        nvram.unlink()
        if how == "directory":
            nvram.mkdir()
    with pytest.raises(FileMirrorError, match=re.escape(str(nvram))):
        mirror.sync()


def test_a_large_file_is_read_only_while_racy(pair, monkeypatch) -> None:
    """Above CONTENT_CHECK_BYTES a check reads the file only when its timestamps are near its last
    read (a later write could carry the same ones): it reads a file just copied, not an old one."""
    _, dest = pair
    big = dest.parent / "src" / "big.ctk"
    big.write_bytes(os.urandom(64 * 1024))
    monkeypatch.setattr("agent.files.CONTENT_CHECK_BYTES", 16 * 1024)
    reads: list[str] = []
    mirror = mirror_of(big, dest=dest, after_read=reads.append)
    mapped = Mapped(big)
    try:
        assert mirror.sync().record()["copied"] == 1 and len(reads) == 1      # no second read above the bound
        new = os.urandom(64 * 1024)
        mapped.write(new)                      # no timestamp changes, but the file is racy: read
        assert mirror.sync().record()["copied"] == 1 and partial(dest, big).read_bytes() == new
        monkeypatch.setattr("agent.files.RACY_MARGIN_NS", -10**18)   # as if its last write were long ago
        reads.clear()
        assert mirror.sync().record()["copied"] == 0 and reads == []
        big.write_bytes(os.urandom(64 * 1024))  # a write that changes the identity is seen without a read
        assert mirror.sync().record()["copied"] == 1 and partial(dest, big).read_bytes() == big.read_bytes()
    finally:
        mapped.close()


# ---- in migrations -------------------------------------------------------------------------------

def vm_files(vm) -> list[Path]:
    return list(vm.files) + [s for side in vm.sidecars.values() for s in side]


def test_issue_reproduction_files_rewritten_during_the_copy(agent_vm, dest_dir: Path) -> None:
    """Defect 4 as filed: --rate 8M, the nvram and the sidecar rewritten two seconds after migrate."""
    vm = agent_vm(n_disks=1, size=128 * MiB)       # 28 MiB of data: 3.5 s at 8 MiB/s
    nvram, ctk = vm.files[0], vm.sidecars["disk0"][0]
    migrate = vm.cli_background("migrate", vm.name, "--dest", str(dest_dir), "--rate", "8M", "--json")
    try:
        time.sleep(2)
        subprocess.run(["sh", "-c", f"echo v2 > {nvram} && echo v2 > {ctk}"], check=True)
        phase = vm.status()["migration"]["phase"]
        out, err = migrate.communicate(timeout=120)
    finally:
        if migrate.poll() is None:
            migrate.kill()
            migrate.communicate()
    assert phase in BEFORE_SWITCHOVER, f"the files were rewritten in {phase}, after the switchover"
    assert migrate.returncode == 0, err + vm.log_text()
    assert (dest_dir / nvram.name).read_bytes() == b"v2\n" and (dest_dir / ctk.name).read_bytes() == b"v2\n"


@pytest.mark.parametrize("phase", BEFORE_SWITCHOVER)
def test_files_changed_in_every_phase_before_switchover(agent_vm, dest_dir: Path, shm_dir: Path,
                                                        phase: str) -> None:
    """Held in PHASE, the nvram is rewritten (a new size) and the sidecar written through a mapping
    (no timestamp changes): the destination holds both as they are at the end."""
    strategy = "legacy" if BEFORE_SWITCHOVER.index(phase) % 2 else "optimized"
    vm = agent_vm(n_disks=1, start=False)
    ctk = shm_dir / "disk0.ctk"
    shutil.move(vm.sidecars["disk0"][0], ctk)
    vm.sidecars["disk0"] = [ctk]
    vm.write_config()
    vm.start(f"hold:{phase}=1")
    mapped = Mapped(ctk)
    try:
        started = vm.cli("migrate", vm.name, "--dest", str(dest_dir), "--stun-strategy", strategy, "--no-wait")
        assert started.returncode == 0, started.stderr
        vm.wait_phase(phase)
        before = stat_id(ctk)
        vm.files[0].write_bytes(os.urandom(5000))
        mapped.write(os.urandom(4096))
        assert stat_id(ctk) == before
        assert vm.status()["migration"]["phase"] == phase, "the files were changed after the phase"
        record = vm.wait_done()
    finally:
        mapped.close()
    assert record["state"] == "success", record["error"]
    for f in vm_files(vm):
        assert (dest_dir / f.name).read_bytes() == f.read_bytes(), f"{f.name} changed in {phase} is stale"
    assert not any(name.endswith(".svmotion-partial") for name in dest_files(dest_dir))


class CounterWriter:
    """Rewrites files in place, each time with the next version (a counter), logging when each write ran."""

    def __init__(self, paths: list[Path]):
        self.sizes = {p: p.stat().st_size for p in paths}
        self.log: dict[Path, list[tuple[float, float]]] = {p: [] for p in paths}   # version n at [n - 1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="counter-writer", daemon=True)

    @staticmethod
    def version(n: int, size: int) -> bytes:
        return (f"version {n:09d} ".encode() * (size // 18 + 1))[:size]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive()

    def _run(self) -> None:
        fds = {p: os.open(p, os.O_WRONLY) for p in self.sizes}
        try:
            n = 0
            while not self._stop.is_set():
                n += 1
                for p, fd in fds.items():
                    begun = time.time()
                    os.pwrite(fd, self.version(n, self.sizes[p]), 0)
                    self.log[p].append((begun, time.time()))
                self._stop.wait(0.002)
        finally:
            for fd in fds.values():
                os.close(fd)

    def version_of(self, path: Path, data: bytes) -> int:
        n = int(data[8:17])
        assert data == self.version(n, self.sizes[path]), f"{path.name}: not a version the writer wrote"
        return n


def test_files_written_all_through_the_migration_are_copied_as_they_were_at_the_cut(agent_vm,
                                                                                    dest_dir: Path) -> None:
    """A writer rewrites the nvram and the sidecar every 2 ms from before `migrate` to after its end.
    The destination holds, for each, a version that was current during the switchover stun, and
    more precisely the one the record's last `files_cut` step names, current during the cut: begun
    before the cut ended, and the next one not finished before the cut began."""
    vm = agent_vm(n_disks=1, size=64 * MiB)
    paths = vm_files(vm)
    writer = CounterWriter(paths)
    writer.start()
    try:
        time.sleep(0.2)
        done = vm.cli("migrate", vm.name, "--dest", str(dest_dir), "--rate", "16M", "--json")
        time.sleep(0.1)                       # the writer goes on past the migration's end
    finally:
        writer.stop()
    assert done.returncode == 0, done.stderr + vm.log_text()
    record = vm.status()["last"]
    stun = [s for s in record["stuns"] if s["kind"] == "switchover" and s["outcome"] == "released"][-1]
    cuts = [s for s in record["steps"] if s["name"] == "files_cut"]
    for p in paths:
        data = (dest_dir / p.name).read_bytes()
        n = writer.version_of(p, data)
        assert len(writer.log[p]) > n + 10, "the writer must go on well past the switchover"
        begun, _ = writer.log[p][n - 1]
        _, next_done = writer.log[p][n]
        assert next_done > stun["started"], f"{p.name}: the destination holds version {n}, but version " \
                                            f"{n + 1} was written before the switchover stun"
        assert begun <= stun["started"] + stun["duration_seconds"]
        assert cuts, "the record names no cut of the files"
        cut = cuts[-1]
        assert cut["checked"] == len(paths) and cut["unstable"] == []
        assert sha(data) == {f["path"]: f["sha256"] for f in cut["files"]}[str(p)], \
            f"{p.name}: the destination is not what the cut copied"
        assert begun <= cut["ended"], f"{p.name}: version {n} was written after the cut"
        assert next_done > cut["started"], f"{p.name}: version {n + 1} was written before the cut, " \
                                           f"the destination holds {n}"
    copies = sum(f["copies"] for s in record["steps"] if s["name"].startswith("files_") for f in s["files"])
    assert copies > len(paths), "nothing was copied again: the race was not exercised"


def test_a_file_rewritten_inside_the_cut_is_copied_as_the_cut_read_it(agent_vm, dest_dir: Path) -> None:
    """Forced with a read gate (tests/readgate.py): the first time the agent reads the nvram, and the
    sidecar, while the switchover stun is held, the file is rewritten (same size) after the agent
    opened and stat'ed it and before its read returns. No copy before the cut saw that version;
    the destination must hold it, and the record's cut step must name it."""
    vm = agent_vm(n_disks=1)
    paths = vm_files(vm)
    written: dict[Path, bytes] = {}

    def before_read(path: Path, pid: int) -> None:
        if pid != vm.proc.pid or path in written:
            return
        stun = vm.plugin("status")["stun"]
        if stun is not None and stun["kind"] == "switchover":
            written[path] = os.urandom(path.stat().st_size)
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, written[path], 0)
            finally:
                os.close(fd)

    with ReadGate(paths, before_read) as gate:
        done = vm.cli("migrate", vm.name, "--dest", str(dest_dir))
    assert not gate.errors, gate.errors
    assert done.returncode == 0, done.stderr + vm.log_text()
    assert sorted(written) == sorted(paths), "the agent did not read every file under the switchover stun"
    cut = [s for s in vm.status()["last"]["steps"] if s["name"] == "files_cut"][-1]
    assert {f["path"]: f["sha256"] for f in cut["files"]} == {str(p): sha(d) for p, d in written.items()}
    assert all(f["copies"] >= 1 for f in cut["files"])
    for p in paths:
        assert (dest_dir / p.name).read_bytes() == written[p] == p.read_bytes()


def test_a_file_that_never_settles_under_the_stun_fails_the_migration_not_the_data(agent_vm, dest_dir: Path) -> None:
    """Forced with the read gate: every read of the nvram by the agent under the switchover stun
    finds it rewritten. Each switchover attempt is given up (no switchover with a stale file), the
    guest is released each time, and after the last attempt the migration fails cleanly."""
    vm = agent_vm(n_disks=1)
    nvram = vm.files[0]
    rewrites = []

    def before_read(path: Path, pid: int) -> None:
        stun = vm.plugin("status")["stun"]
        if pid == vm.proc.pid and stun is not None and stun["kind"] == "switchover":
            rewrites.append(stun["id"])
            nvram.write_bytes(os.urandom(8192))

    writer = vm.writer()
    writer.start()
    try:
        with ReadGate([nvram], before_read) as gate:
            done = vm.cli("migrate", vm.name, "--dest", str(dest_dir))
    finally:
        report = writer.stop()
    assert not gate.errors, gate.errors
    assert done.returncode == 5, done.stdout + done.stderr
    assert "kept changing" in done.stderr and str(nvram) in done.stderr, done.stderr
    stuns = [s for s in vm.plugin("status")["stuns"] if s["kind"] == "switchover"]
    assert len(set(rewrites)) == len(stuns) == SWITCHOVER_ATTEMPTS
    assert all(s["outcome"] == "released" for s in stuns), stuns
    assert_on_intact_source(vm, writer, report)
    assert dest_files(dest_dir) == []


@pytest.mark.parametrize("how", ["vanished", "not a file"])
def test_a_file_lost_mid_migration_fails_it_cleanly(agent_vm, dest_dir: Path, how: str) -> None:
    """The nvram deleted, or the sidecar replaced by a directory, during DiskCopy: the migration
    fails (exit 5) naming the file, the workload runs on its intact source, no partial remains."""
    vm = agent_vm(n_disks=1, inject="hold:DiskCopy=1")
    lost = vm.files[0] if how == "vanished" else vm.sidecars["disk0"][0]
    writer = vm.writer()
    writer.start()
    try:
        migrate = vm.cli_background("migrate", vm.name, "--dest", str(dest_dir))
        vm.wait_phase("DiskCopy")
        lost.unlink()
        if how == "not a file":
            lost.mkdir()
        out, err = migrate.communicate(timeout=60)
    finally:
        report = writer.stop()
    assert migrate.returncode == 5, out + err
    assert str(lost) in err and "intact source" in err, err
    assert_on_intact_source(vm, writer, report)
    assert dest_files(dest_dir) == []
