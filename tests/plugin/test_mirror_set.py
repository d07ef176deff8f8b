"""`mirror_set`: a running mirror's mode, the guest's throttle and the copier's rate, changed
without a stun under a writer; and what it refuses.

Mode switches are done while the copier runs and the writer writes; every sequence must end with
the destination equal to the source at switchover and the writer's model after it (the rule each
switch keeps is in nbd_plugin/mirror.py). The throttle delays each guest update by what was set,
is counted, never exceeds what was set, and lifts when set to 0.
"""
from __future__ import annotations

import time
from pathlib import Path

import nbd
import pytest

from agent.jsonlines import RemoteError
from test_mirror import (Flow, assert_clean, disk_status, make_dests, start_writer, wait_copies, wait_writes)

KiB, MiB = 1 << 10, 1 << 20

SWITCHES = {
    "async-sync-async": ["async", "sync", "async"],
    "sync-async-sync": ["sync", "async", "sync"],
    "dirty-async-dirty": ["dirty", "async", "dirty"],
    "async-dirty-sync": ["async", "dirty", "sync"],
}


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_mode_switches_during_the_copy_end_byte_identical(vm_factory, tmp_path: Path, testlib, name: str) -> None:
    first, *then = SWITCHES[name]
    size = 16 * MiB
    node = vm_factory(2, size=size)
    ctl = node.client()
    dests = make_dests(tmp_path / "dst", node.disks)
    flow = Flow(ctl, node.disks, dests, mode=first, granularity=16 * KiB, rate=size)   # ~1 s per disk pair
    writer = start_writer(node, connections=2, queue_depth=8, zero_ratio=0.03, trim_ratio=0.03)
    try:
        wait_writes(writer, 20)
        flow.install()
        ctl.call("copy", kind="bulk", rate=flow.rate)
        for mode in then:            # each switch while the bulk copy runs and the writer writes
            wait_writes(writer, 100)
            reply = ctl.call("mirror_set", mode=mode)
            assert {d["mode"] for d in reply["disks"].values()} == {mode}, reply
            assert {d["mode"] for d in disk_status(ctl).values()} == {mode}
            assert any(d["copy"]["running"] for d in disk_status(ctl).values()), "the copy ended too soon"
        ctl.call("mirror_set", rate=0)          # the rest of the pass unpaced
        wait_copies(ctl)
        wait_writes(writer, 100)
        flow.converge()
        seen: dict[str, list] = {}
        flow.switchover(lambda: seen.update(
            {n: testlib.same_content(node.disks[n], dests[n]) for n in node.disks}))
        assert seen == {n: [] for n in node.disks}, f"destination differs from the source at switchover: {seen}"
        ctl.call("finish")
        wait_writes(writer, 20)
    finally:
        report = writer.stop()
    assert_clean(writer, report, dests)


def test_the_throttle_delays_each_update_by_what_was_set_and_lifts(vm_factory, tmp_path: Path) -> None:
    node = vm_factory(1, size=4 * MiB)
    ctl = node.client()
    flow = Flow(ctl, node.disks, make_dests(tmp_path / "dst", node.disks), mode="async")
    flow.install()
    flow.copy("bulk")
    h = nbd.NBD()
    h.connect_uri(node.uri("disk0"))
    try:
        delay = 0.02
        assert ctl.call("mirror_set", throttle=delay)["disks"]["disk0"]["throttle_seconds"] == delay
        t0 = time.monotonic()
        for i in range(10):
            h.pwrite(b"\x5a" * 4096, i * 4096)
        assert time.monotonic() - t0 >= 10 * delay, "the writes were not delayed"
        status = disk_status(ctl)["disk0"]
        assert status["throttled_requests"] >= 10 and status["throttled_seconds"] >= 10 * delay - 1e-6
        assert status["throttle_seconds"] == delay and status["throttle_max_seconds"] == delay
        ctl.call("mirror_set", throttle=0.0)
        before = disk_status(ctl)["disk0"]["throttled_requests"]
        h.pwrite(b"\xa5" * 4096, 0)
        lifted = disk_status(ctl)["disk0"]
        assert lifted["throttled_requests"] == before and lifted["throttle_seconds"] == 0.0
        assert lifted["throttle_max_seconds"] == delay, "the largest delay applied is kept"
    finally:
        h.shutdown()


@pytest.mark.parametrize("request_args, words", [
    ({"mode": "asynch"}, "mode"),
    ({"throttle": 1.5}, "throttle"),
    ({"throttle": -0.001}, "throttle"),
    ({"rate": -1}, "rate"),
    ({"disk": "nope", "mode": "sync"}, "unknown disk"),
    ({"speed": 1}, "unknown argument"),
])
def test_mirror_set_refuses_bad_input_and_changes_nothing(vm_factory, tmp_path: Path, request_args, words) -> None:
    node = vm_factory(1, size=4 * MiB)
    ctl = node.client()
    Flow(ctl, node.disks, make_dests(tmp_path / "dst", node.disks), mode="sync").install()
    with pytest.raises(RemoteError, match=words):
        ctl.call("mirror_set", **request_args)
    disk = disk_status(ctl)["disk0"]
    assert (disk["mode"], disk["throttle_seconds"]) == ("sync", 0.0)


def test_mirror_set_needs_a_mirroring_disk(vm_factory) -> None:
    ctl = vm_factory(1, size=4 * MiB).client()
    with pytest.raises(RemoteError, match="no disk is mirroring"):
        ctl.call("mirror_set", mode="async")
