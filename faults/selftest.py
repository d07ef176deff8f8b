"""The campaign's self-test: a lost write must be caught, by fio's replay and by the writer's model.

Design notes
- A verifier that cannot fail proves nothing. This runs the campaign's own workload (FioWorkload,
  VerifyingWriter) on a real agent's VM, with no migration, checks that the campaign's own
  verification (`trial.data_check`) passes, then makes one acknowledged write of each verifier
  "lost" the way a broken mirror loses it: the block goes back to what it held before the write
  (fio: the content from a snapshot taken before the round that wrote it; writer: the disk's
  initial pattern, under writes of later generations). Each verifier must name exactly that
  block, and the trial's data check must fail.
- fio writes each block once per trial (fio.py says why: its replay does not check the seed, so
  fio's own older data would pass); the older version of a fio block is therefore pre-fio data.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from svlab.writer import BLOCK, PATTERN, block_pattern, patch_image
from faults.fio import FioWorkload
from faults.params import MiB, draw
from faults.resources import Resources
from faults.trial import AgentPool, build_vm, data_check, make_writers, stop_writers, writer_region

DISK = 8 * MiB


def wait_rounds(fio: FioWorkload, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(r.complete for r in fio.rounds) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"fio completed {sum(r.complete for r in fio.rounds)} rounds, not {count}: "
                                 f"{fio.logs[-1:] or 'no error logged'}")
        time.sleep(0.05)


def run(workroot: Path) -> list[str]:
    """The self-test; returns what it showed, raises AssertionError when a verifier missed."""
    shown = []
    root = Path(tempfile.mkdtemp(prefix="selftest-", dir=workroot))
    res = Resources(root)
    res.defer(f"remove {root}", shutil.rmtree, root, True)
    try:
        params = draw(1)
        params.disk_sizes, params.layout = [DISK], "dense"
        params.fio.bs, params.fio.iodepth, params.fio.rate, params.fio.round_s = 4096, 4, 2 * MiB, 0.5
        pool = AgentPool()
        res.defer("stop the agent", pool.close)
        vm, initial = build_vm(params, root, pool)
        vm.start(wait_nbdkit=True)
        source = vm.disks["disk0"]
        fio = FioWorkload({"disk0": DISK}, vm.nbd_socket, params.fio, 7, root / "fio", res)
        res.defer("stop fio", fio.stop)
        writers = make_writers(params, vm, initial, 0)
        res.defer("stop the writer", stop_writers, writers)
        for w in writers.values():
            w.start()
        fio.start()
        wait_rounds(fio, 2)
        fio.stop()
        later = len(fio.rounds)                   # the first round after the snapshot
        snapshot = root / "snapshot.raw"
        shutil.copyfile(source, snapshot)
        fio.start()
        wait_rounds(fio, later + 2)
        fio.stop()
        stop_writers(writers)
        clean, lost = data_check(vm, params, fio, [(0, writers)])
        assert clean.ok and not lost, f"a clean run must verify: {clean.detail}"
        shown.append(f"clean run verified: {clean.detail}")

        # fio: a block of a round after the snapshot goes back to what it held before fio wrote it.
        sub = fio.sub_size("disk0")
        stale = later * sub + sub // 2
        before = snapshot.read_bytes()[stale:stale + BLOCK]
        assert before == block_pattern("disk0", stale, 0), f"round {later}'s area was written before it"
        patch_image(source, stale, before)
        verdict = fio.verify(lambda d: ("nbd", vm.uri(d)))
        found = [o for _, o, _ in verdict.bad]
        assert found == [stale], f"fio missed the lost write at {stale:#x}: {verdict.summary()}"
        shown.append(f"fio caught the lost write at {stale:#x}: {verdict.bad[0][2]}")

        # the writer: a block it wrote (maybe several times) goes back to the disk's initial pattern.
        w = writers["disk0"]
        start, length = writer_region(DISK, 0)
        written = [o for o in range(start, start + length, BLOCK)
                   if w.expected("disk0", o, BLOCK) != block_pattern("disk0", o, 0)]
        assert written and initial["disk0"] == PATTERN, "the writer wrote nothing in its region"
        lost_block = written[len(written) // 2]
        patch_image(source, lost_block, block_pattern("disk0", lost_block, 0))
        bad = w.verify_nbd("disk0", vm.uri("disk0"), (start, length))
        assert bad == [lost_block], f"the writer missed the lost write at {lost_block:#x}: {bad[:5]}"
        shown.append(f"the writer caught the lost write at {lost_block:#x}: {w.describe('disk0', lost_block)}")
        check, count = data_check(vm, params, fio, [(0, writers)])
        assert check.ok is False and count == 2, f"the trial's data check must fail on both: {check.detail}"
        shown.append(f"the trial's data check failed as it must: {check.detail[:200]}")
    finally:
        res.close()
        left = res.errors + res.leftovers()
        if left:
            raise AssertionError(f"the self-test left something behind: {left}")
    return shown


def self_test(workroot: Path) -> int:
    try:
        for text in run(workroot):
            print(f"self-test: {text}", flush=True)
    except AssertionError as err:
        print(f"self-test FAILED: {err}", flush=True)
        return 1
    print("self-test passed: both verifiers catch a lost write", flush=True)
    return 0
