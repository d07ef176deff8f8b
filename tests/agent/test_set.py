"""`svmotion set` on a running migration under the verifying writer (issue 12, test 4).

Real agent, real nbdkit running the mirror node, real libnbd writer. The bulk copy is slowed by
`--rate` so that every switch lands while the disks are mirroring (each change record says in
which phase and how it was applied); the mirror mode goes through all six directed switches,
async -> sync -> async among them, and the rate, the throttle bound and the stun budget change
too. The destination must equal the writer's model (and `--verify` its frozen source), the
writer must see no error, and the changes must be in the record and the final table.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from svlab.writer import file_digest

MiB = 1024 * 1024
# Each directed switch between the three modes once, starting from the async the migration
# was given at FileCreate (before the mirror is installed): a->s, s->a, a->d, d->s, s->d, d->a.
MODES = ["sync", "async", "dirty", "sync", "dirty", "async"]
MIRRORING = ("DiskCopy", "CopyDirtyInfo", "CopyDirtyData")


def set_ok(vm, *args: str) -> dict:
    done = vm.cli("set", vm.name, *args, "--json")
    assert done.returncode == 0, done.stderr + vm.log_text()
    return json.loads(done.stdout)


def test_every_switch_under_the_writer_ends_byte_identical(agent_vm, dest_dir: Path, tmp_path: Path) -> None:
    vm = agent_vm(n_disks=2, size=32 * MiB, inject="hold:FileCreate=2,hold:CopyDirtyData.released=3")
    writer = vm.writer(rate=2 * MiB)
    report_file = tmp_path / "report.json"
    writer.start()
    try:
        # 512 KiB/s for ~14 MiB of data: the bulk copy lasts long enough for every switch below.
        migrate = vm.cli_background("migrate", vm.name, "--dest", str(dest_dir), "--mirror", "sync",
                                    "--rate", "512K", "--verify", "--json", "--report", str(report_file))
        vm.wait_phase("FileCreate")
        early = set_ok(vm, "--mirror", "async")["changes"]
        assert [(c["what"], c["from"], c["to"], c["applied"]) for c in early] == \
            [("mirror", "sync", "async", "options")]
        vm.wait_phase("DiskCopy")
        assert vm.plugin("status")["disks"]["disk0"]["mode"] == "async", "the install read the changed option"
        changes = []
        for mode in MODES:
            changes += set_ok(vm, "--mirror", mode)["changes"]
            assert {d["mode"] for d in vm.plugin("status")["disks"].values()} == {mode}
        changes += set_ok(vm, "--rate", "1M", "--max-throttle", "20ms", "--stun-budget", "20ms")["changes"]
        again = vm.cli("set", vm.name, "--mirror", "async")
        assert again.returncode == 0 and "nothing changed" in again.stdout, again.stdout + again.stderr
        assert all(c["phase"] in MIRRORING for c in changes), changes
        assert all(c["applied"] == ("mirror node" if c["what"] in ("mirror", "rate") else "agent")
                   for c in changes), changes
        status = vm.status()["migration"]
        assert status["options"]["mirror"] == "async" and status["options"]["max_throttle"] == 0.02
        assert status["convergence"]["max_throttle"] == 0.02
        changes += set_ok(vm, "--rate", "0")["changes"]      # now let the copy finish
        vm.wait_for_log("SVMOTION_INJECT hold at CopyDirtyData.released")
        late = vm.cli("set", vm.name, "--mirror", "sync")
        assert late.returncode == 3 and "already switched" in late.stderr, late.stdout + late.stderr
        assert len(late.stderr.strip().splitlines()) == 1
        stdout, stderr = migrate.communicate(timeout=120)
        assert migrate.returncode == 0, stderr + vm.log_text()
        record = json.loads(stdout)
        sources = {d: file_digest(p) for d, p in vm.disks.items()}
        moved = writer.snapshot().writes
        time.sleep(0.5)                        # the guest goes on writing, on the destination now
    finally:
        report = writer.stop()
    assert not report.errors, report.errors
    assert report.writes > moved > 0
    assert record["state"] == "success" and record["verify"]["result"] == "match", record
    for d, path in vm.disks.items():
        assert file_digest(path) == sources[d], f"source of {d} written after switchover"
        bad = writer.verify_image(d, dest_dir / f"{d}.raw")
        assert not bad, f"{d}: {len(bad)} bad blocks, first {writer.describe(d, bad[0])}"
    recorded = [(c["what"], c["to"]) for c in record["changes"]]
    assert recorded == [(c["what"], c["to"]) for c in early + changes], record["changes"]
    assert [to for what, to in recorded if what == "mirror"] == ["async", *MODES]
    # The report lists them.
    summary = vm.cli("report", str(report_file))
    assert summary.returncode == 0, summary.stderr
    assert "set mirror async -> sync in DiskCopy (by the mirror node, no stun)" in summary.stdout or \
        "set mirror async -> sync in CopyDirtyData (by the mirror node, no stun)" in summary.stdout, summary.stdout
    assert "set mirror sync -> async in FileCreate (before the mirror was installed)" in summary.stdout


def test_a_resumed_migration_keeps_what_set_changed(agent_vm, dest_dir: Path) -> None:
    """The changes are in the journal: an agent killed after them resumes with them."""
    vm = agent_vm(n_disks=1, inject="hold:DiskCopy=30")
    assert vm.cli("migrate", vm.name, "--dest", str(dest_dir), "--no-wait").returncode == 0
    vm.wait_for_log("SVMOTION_INJECT hold at DiskCopy")
    set_ok(vm, "--mirror", "dirty", "--max-throttle", "20ms", "--stun-budget", "20ms")
    vm.kill_agent()
    vm.start()                 # no injection now: the restarted agent resumes
    last = vm.wait_done()
    assert last["state"] == "success" and any("resumed" in w for w in last["warnings"]), last
    assert (last["options"]["mirror"], last["options"]["max_throttle"], last["options"]["stun_budget"]) == \
        ("dirty", 0.02, 0.02)
    assert [(c["what"], c["to"]) for c in last["changes"]] == \
        [("mirror", "dirty"), ("max_throttle", 0.02), ("stun_budget", 0.02)]
