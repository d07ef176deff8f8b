"""The verifying writer itself, against nbdkit's file plugin: it must notice what it is meant to notice.

A verifier that cannot fail proves nothing, so these tests corrupt, misplace and stale blocks
behind its back and check that `verify_image` / `verify_nbd` name exactly those blocks.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from svlab.writer import BLOCK, PATTERN, VerifyingWriter, block_pattern, patch_image

MiB = 1024 * 1024


def run_writer(uri: str, seconds: float = 0.7, **options) -> tuple[VerifyingWriter, object]:
    writer = VerifyingWriter({"disk0": uri}, seed=3, **options)
    writer.start()
    try:
        time.sleep(seconds)
    finally:
        report = writer.stop()
    return writer, report


@pytest.mark.parametrize("max_write", [256 * 1024, 8 * 1024, 4096])
def test_clean_run_verifies_and_counts(tmp_path: Path, testlib, start_file_server, max_write: int) -> None:
    image = testlib.make_dense_image(tmp_path / "disk0.raw", 8 * MiB)
    uri = start_file_server(image)
    writer, report = run_writer(uri, initial={"disk0": PATTERN}, connections=3, queue_depth=6,
                                zero_ratio=0.05, trim_ratio=0.05, max_write=max_write)
    assert not report.errors and report.writes > 50 and report.zeroes and report.trims, report.summary()
    assert report.max_latency >= report.percentile(50) > 0
    assert 0 < report.longest_stall < 5
    assert writer.verify_image("disk0", image) == []
    assert writer.verify_nbd("disk0", uri) == []


def test_corrupt_misplaced_and_stale_blocks_are_named(tmp_path: Path, testlib, start_file_server) -> None:
    image = testlib.make_sparse_image(tmp_path / "disk0.raw", 8 * MiB, [(0, 2 * MiB)])
    initial = tmp_path / "initial.raw"
    shutil.copyfile(image, initial)
    uri = start_file_server(image)
    writer, report = run_writer(uri, initial={"disk0": initial}, region=(0, 4 * MiB))
    assert not report.errors and writer.verify_image("disk0", image) == []
    written = [o for o in range(0, 4 * MiB, BLOCK) if writer.expected("disk0", o, BLOCK) != initial.read_bytes()[o:o + BLOCK]]
    assert len(written) > 10, "the writer changed too few blocks for this test"
    corrupt, misplaced, stale = written[0], written[len(written) // 2], written[-1]
    patch_image(image, corrupt + 100, b"\xff")                                       # one flipped byte
    patch_image(image, misplaced, writer.expected("disk0", corrupt, BLOCK))           # right data, wrong place
    patch_image(image, stale, initial.read_bytes()[stale:stale + BLOCK])            # an older version
    patch_image(image, 6 * MiB, block_pattern("disk0", 6 * MiB, 0))                 # data where a hole must be
    assert writer.verify_image("disk0", image) == sorted([corrupt, misplaced, stale, 6 * MiB])
    assert writer.verify_nbd("disk0", uri) == sorted([corrupt, misplaced, stale, 6 * MiB])
    assert "found pattern" in writer.describe("disk0", misplaced, writer.expected("disk0", corrupt, BLOCK))


def test_region_verification_checks_only_its_region(tmp_path: Path, testlib, start_file_server) -> None:
    """Another workload (fio in the fault campaign) owns the rest of the disk: a region check
    ignores it, and still names a stale block inside the region."""
    image = testlib.make_dense_image(tmp_path / "disk0.raw", 8 * MiB)
    uri = start_file_server(image)
    region = (3 * MiB, 2 * MiB + 8 * BLOCK)            # not aligned to the 1 MiB verify reads
    writer, report = run_writer(uri, initial={"disk0": PATTERN}, region=region)
    assert not report.errors and writer.verify_image("disk0", image, region) == []
    patch_image(image, 0, os.urandom(MiB))                                  # someone else's data outside
    assert writer.verify_nbd("disk0", uri, region) == []
    assert writer.verify_image("disk0", image)[:1] == [0]             # the whole disk does notice
    written = [o for o in range(region[0], sum(region), BLOCK)
               if writer.expected("disk0", o, BLOCK) != block_pattern("disk0", o, 0)]
    assert written, "the writer changed no block of its region"
    patch_image(image, written[-1], block_pattern("disk0", written[-1], 0))  # a lost write: the older version
    assert writer.verify_nbd("disk0", uri, region) == [written[-1]]
    with pytest.raises(ValueError, match="aligned"):
        writer.verify_image("disk0", image, (100, BLOCK))


def test_verify_refuses_while_running_and_rate_limit_holds(tmp_path: Path, testlib, start_file_server) -> None:
    image = testlib.make_dense_image(tmp_path / "disk0.raw", 8 * MiB)
    uri = start_file_server(image)
    writer = VerifyingWriter({"disk0": uri}, initial={"disk0": PATTERN}, rate=1 * MiB, seed=5)
    writer.start()
    try:
        with pytest.raises(RuntimeError, match="stop"):
            writer.verify_image("disk0", image)
        time.sleep(1.0)
    finally:
        report = writer.stop()
    # 1 MiB/s for about a second, plus the short burst the limiter allows: never several MiB.
    assert report.bytes_written <= 2 * MiB, report.summary()
    assert writer.verify_image("disk0", image) == []
