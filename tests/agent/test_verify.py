"""Verification: `migrate --verify` and `svmotion verify VM --against DIR`, by per-chunk digests.

The guest writes through all of it: chunks it rewrote since the switchover are skipped, the rest
must match. A destination corrupted behind nbdkit's back (on a chunk the guest does not write,
after the switchover, before the verification: SVMOTION_INJECT holds the engine at Complete) is a
failed verification at the corrupted byte, and the source is kept even with --delete-source.
"""
from __future__ import annotations

import json
import os
import re
import urllib.request
from pathlib import Path

MiB = 1 << 20
SIZE = 32 * MiB
HALF = (0, SIZE // 2)                      # the writer's region in the corruption tests
# In make_disk's data extent at 6.5/8 of the disk, outside the writer's region.
CORRUPT_AT = 6 * (SIZE // 8) + SIZE // 16 + 12345


def scrape(vm) -> str:
    port = re.search(r"serving http://127\.0\.0\.1:(\d+)/metrics", vm.log_text()).group(1)
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    found = re.search(rf"^{name}{{{re.escape(want)}}} (\S+)$", text, re.M)
    assert found, f"{name}{{{want}}} not in the scrape"
    return float(found.group(1))


def flip_byte(path: Path, offset: int) -> None:
    """Change one byte of a file behind nbdkit's back (it shares the page cache)."""
    fd = os.open(path, os.O_RDWR)
    try:
        old = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([old[0] ^ 0xFF]), offset)
    finally:
        os.close(fd)


def test_migrate_verify_under_a_writer_matches_and_skips_what_the_guest_rewrote(
        agent_vm, dest_dir: Path, tmp_path: Path) -> None:
    # The hold lets the guest write to the destination between the switchover and the verification.
    vm = agent_vm(n_disks=2, size=SIZE, inject="hold:Complete=1")
    writer = vm.writer()
    writer.start()
    try:
        report_file = tmp_path / "report.json"
        done = vm.cli("migrate", vm.name, "--dest", str(dest_dir), "--verify", "--delete-source", "--json",
                      "--report", str(report_file))
    finally:
        report = writer.stop()
    assert done.returncode == 0, done.stderr + vm.log_text()
    assert not report.errors, report.errors[:3]
    record = json.loads(done.stdout)
    verify = record["verify"]
    assert record["state"] == "success" and verify["result"] == "match", verify
    assert verify["first_mismatch"] is None and verify["tracked"] is True
    assert verify["verified_bytes"] + verify["skipped_bytes"] == 2 * SIZE, verify
    assert 0 < verify["skipped_bytes"] < SIZE, "the guest wrote after the switchover: some chunks are skipped"
    assert "verify" in [s["name"] for s in record["steps"]]
    for name in vm.disks:
        assert not writer.verify_image(name, dest_dir / f"{name}.raw")
        assert not vm.disks[name].exists(), "a verified source is deleted with --delete-source"
    summary = vm.cli("report", str(report_file))
    assert "verify: match" in summary.stdout, summary.stdout + summary.stderr
    scraped = scrape(vm)
    assert metric(scraped, "svmotion_verifications_total", result="match", vm="vm1") == 1
    assert metric(scraped, "svmotion_verifications_total", result="mismatch", vm="vm1") == 0
    assert metric(scraped, "svmotion_verified_bytes_total", vm="vm1") == verify["verified_bytes"]
    assert metric(scraped, "svmotion_verify_skipped_bytes_total", vm="vm1") == verify["skipped_bytes"]


def test_a_corrupted_destination_fails_verification_at_its_offset_and_keeps_the_source(
        agent_vm, dest_dir: Path) -> None:
    vm = agent_vm(n_disks=1, size=SIZE, inject="hold:Complete=3")
    writer = vm.writer(region=HALF)
    writer.start()
    try:
        migrate = vm.cli_background("migrate", vm.name, "--dest", str(dest_dir), "--verify", "--delete-source",
                                    "--json")
        try:
            vm.wait_phase("Complete", timeout=60)        # switched over; held before the verification
            flip_byte(dest_dir / "disk0.raw", CORRUPT_AT)
            out, err = migrate.communicate(timeout=60)
        finally:
            if migrate.poll() is None:
                migrate.kill()
                migrate.communicate()
    finally:
        report = writer.stop()
    assert migrate.returncode == 8, out + err
    assert f"disk disk0 differs from its source {vm.disks['disk0']} at offset {CORRUPT_AT}" in err, err
    assert "runs on its destination" in err and "source is kept" in err, err
    record = json.loads(out)
    assert record["state"] == "failed" and record["verify"]["result"] == "mismatch"
    assert record["verify"]["first_mismatch"] == {"disk": "disk0", "offset": CORRUPT_AT,
                                                  "reference": str(vm.disks["disk0"])}
    # The destination is authoritative since the switchover: the VM runs on it, the source stays.
    assert not report.errors, report.errors[:3]
    assert vm.disks["disk0"].exists() and all(f.exists() for f in vm.files)
    assert vm.plugin("hello")["disks"][0]["path"] == str(dest_dir / "disk0.raw")
    assert vm.status()["disks"] == [{"name": "disk0", "path": str(dest_dir / "disk0.raw")}]
    assert writer.verify_image("disk0", dest_dir / "disk0.raw") == [CORRUPT_AT // 4096 * 4096]
    assert metric(scrape(vm), "svmotion_verifications_total", result="mismatch", vm="vm1") == 1


def test_verify_on_demand_against_a_directory(agent_vm, dest_dir: Path, tmp_path: Path) -> None:
    vm = agent_vm(n_disks=2, size=SIZE)
    source_dir = vm.disks["disk0"].parent
    writer = vm.writer(region=HALF)
    writer.start()
    try:
        done = vm.cli("migrate", vm.name, "--dest", str(dest_dir))
        assert done.returncode == 0, done.stderr
        # The guest goes on writing to the destination; the old source is the reference.
        match = vm.cli("verify", vm.name, "--against", str(source_dir), "--json")
        flip_byte(source_dir / "disk1.raw", CORRUPT_AT)
        mismatch = vm.cli("verify", vm.name, "--against", str(source_dir))
        refusals = {
            "missing dir": vm.cli("verify", vm.name, "--against", str(tmp_path / "nowhere")),
            "no disks": vm.cli("verify", vm.name, "--against", str(tmp_path)),
            "itself": vm.cli("verify", vm.name, "--against", str(dest_dir)),
            "unknown vm": vm.cli("verify", "vm9", "--against", str(source_dir)),
        }
        usage = vm.cli("verify", vm.name, "--against", str(source_dir), "--granularity", "3K")
        too_coarse = vm.cli("verify", vm.name, "--against", str(source_dir), "--granularity", "128M")
    finally:
        report = writer.stop()
    assert not report.errors, report.errors[:3]
    assert match.returncode == 0, match.stdout + match.stderr
    record = json.loads(match.stdout)
    assert record["result"] == "match" and record["against"] == str(source_dir), record
    assert record["verified_bytes"] + record["skipped_bytes"] == 2 * SIZE and record["tracked"]
    assert mismatch.returncode == 8, mismatch.stdout + mismatch.stderr
    assert f"disk disk1 differs from {source_dir / 'disk1.raw'} at offset {CORRUPT_AT}" in mismatch.stdout
    for what, refused in refusals.items():
        assert refused.returncode == 3, (what, refused.stderr)
    assert "not a directory" in refusals["missing dir"].stderr
    assert "disk0.raw" in refusals["no disks"].stderr and "missing" in refusals["no disks"].stderr
    assert "itself" in refusals["itself"].stderr
    assert usage.returncode == 2 and "3K" in usage.stderr, usage.stderr
    assert too_coarse.returncode == 2 and "granularity" in too_coarse.stderr, too_coarse.stderr
    scraped = scrape(vm)
    assert metric(scraped, "svmotion_verifications_total", result="match", vm="vm1") == 1
    assert metric(scraped, "svmotion_verifications_total", result="mismatch", vm="vm1") == 1
