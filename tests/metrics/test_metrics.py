"""agent.metrics on its own registry: names, labels, buckets, the plugin collector, /metrics."""

from __future__ import annotations

import subprocess

import pytest
from promlab import disk_status, fetch, need, sample_names, status_reply

from agent import metrics


def value(name: str, **labels: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(name, labels)


def test_stun_buckets_tell_half_a_millisecond_from_5_ms_from_100_ms(registry):
    for seconds in (0.0005, 0.005, 0.1):
        metrics.observe_stun("vm1", "switchover", "optimized", seconds, seconds / 2)
    bucket = "svmotion_stun_duration_seconds_bucket"
    labels = dict(vm="vm1", kind="switchover", strategy="optimized")
    # each stun lands in its own bucket: some boundary separates every pair
    assert value(bucket, le="0.0005", **labels) == 1
    assert value(bucket, le="0.001", **labels) == 1
    assert value(bucket, le="0.005", **labels) == 2
    assert value(bucket, le="0.01", **labels) == 2
    assert value(bucket, le="0.1", **labels) == 3
    assert value("svmotion_stun_duration_seconds_count", **labels) == 3
    assert value("svmotion_stun_guest_wait_seconds_sum", **labels) == pytest.approx(0.10550 / 2)


def test_stuns_are_labelled_by_kind_and_strategy(registry):
    metrics.observe_stun("vm1", "mirror_install", "legacy", 0.2, 0.19)
    metrics.observe_stun("vm1", "switchover", "optimized", 0.003, 0.002)
    assert value("svmotion_stun_duration_seconds_count", vm="vm1", kind="mirror_install",
                 strategy="legacy") == 1
    assert value("svmotion_stun_duration_seconds_sum", vm="vm1", kind="switchover",
                 strategy="optimized") == pytest.approx(0.003)
    assert value("svmotion_stun_duration_seconds_count", vm="vm1", kind="switchover",
                 strategy="legacy") is None


def test_bad_values_are_refused_with_the_allowed_ones(registry):
    with pytest.raises(ValueError, match="unknown stun kind 'other': use one of mirror_install, switchover"):
        metrics.observe_stun("vm1", "other", "optimized", 0.1, 0.1)
    with pytest.raises(ValueError, match="unknown phase 'Copy'"):
        metrics.set_phase("vm1", "Copy")
    with pytest.raises(ValueError, match="unknown migration result 'ok'"):
        metrics.count_migration("vm1", "ok")


def test_phase_gauge_marks_exactly_the_current_phase(registry):
    metrics.set_phase("vm1", "DiskCopy")
    metrics.set_phase("vm1", "CopyDirtyData")
    states = {p: value("svmotion_migration_phase", vm="vm1", phase=p) for p in metrics.PHASES}
    assert states == {p: (1.0 if p == "CopyDirtyData" else 0.0) for p in metrics.PHASES}
    metrics.set_phase("vm1", None)
    assert all(value("svmotion_migration_phase", vm="vm1", phase=p) == 0 for p in metrics.PHASES)


def test_counters_exist_at_zero_once_the_vm_is_known(registry):
    # so the first failure is a visible 0 -> 1 step for increase() and the alert
    metrics.set_nbdkit_up("vm1", True)
    for result in metrics.RESULTS:
        assert value("svmotion_migrations_total", vm="vm1", result=result) == 0
    assert value("svmotion_dirty_passes_total", vm="vm1") == 0
    metrics.count_migration("vm1", "failed")
    metrics.count_pass("vm1")
    metrics.count_pass("vm1")
    assert value("svmotion_migrations_total", vm="vm1", result="failed") == 1
    assert value("svmotion_dirty_passes_total", vm="vm1") == 2


def test_agent_gauges(registry):
    metrics.set_nbdkit_up("vm1", False)
    metrics.set_predicted_stun("vm1", 0.012)
    metrics.observe_phase("vm1", "DiskCopy", 3.5)
    assert value("svmotion_nbdkit_up", vm="vm1") == 0
    assert value("svmotion_predicted_switchover_stun_seconds", vm="vm1") == 0.012
    assert value("svmotion_phase_duration_seconds_sum", vm="vm1", phase="DiskCopy") == 3.5
    assert value("svmotion_agent_up") == 1
    assert value("svmotion_agent_info", version=metrics.VERSION) == 1


def test_plugin_collector_turns_disk_status_into_families(registry):
    replies = {"vm1": status_reply("vm1", [
        disk_status("disk0", dirty=65536, bulk=1 << 20, dirty_copied=8192, guest=12288,
                    dirtied=8192, errors={"dest:pwrite": 3, "source:flush": 1},
                    latency=([0.0001, 0.001, 0.01], [2, 5, 7], 0.021, 8)),
        disk_status("disk1", dirty=0, bulk=4096),
    ])}
    calls = []
    metrics.register_plugin_collector(lambda: calls.append(1) or replies)
    before = len(calls)
    v = lambda name, **l: value(name, vm="vm1", **l)  # noqa: E731
    assert v("svmotion_dirty_bytes", disk="disk0") == 65536
    assert len(calls) > before  # read at scrape time, not cached at registration
    assert v("svmotion_copied_bytes_total", disk="disk0", kind="bulk") == 1 << 20
    assert v("svmotion_copied_bytes_total", disk="disk0", kind="dirty") == 8192
    assert v("svmotion_copied_bytes_total", disk="disk1", kind="bulk") == 4096
    assert v("svmotion_guest_written_bytes_total", disk="disk0") == 12288
    assert v("svmotion_dirtied_bytes_total", disk="disk0") == 8192
    assert v("svmotion_backend_errors_total", disk="disk0", side="dest", op="pwrite") == 3
    assert v("svmotion_backend_errors_total", disk="disk0", side="source", op="flush") == 1
    # known pairs exist at 0 before their first error (so rate() sees that error)
    assert v("svmotion_backend_errors_total", disk="disk1", side="dest", op="pwrite") == 0
    assert v("svmotion_backend_errors_total", disk="disk1", side="source", op="pread") == 0
    assert v("svmotion_guest_write_latency_seconds_bucket", disk="disk0", le="0.001") == 5
    assert v("svmotion_guest_write_latency_seconds_bucket", disk="disk0", le="+Inf") == 8
    assert v("svmotion_guest_write_latency_seconds_count", disk="disk0") == 8
    assert v("svmotion_guest_write_latency_seconds_sum", disk="disk0") == pytest.approx(0.021)

    assert v("svmotion_guest_throttle_delay_seconds", disk="disk1") == 0.0
    assert v("svmotion_guest_throttle_seconds_total", disk="disk1") == 0.0

    # the collector follows the plugin: new figures show at the next scrape
    replies["vm1"]["disks"]["disk0"]["dirty_bytes"] = 4096
    assert v("svmotion_dirty_bytes", disk="disk0") == 4096


def test_throttle_figures_come_from_the_plugin_and_the_stall_from_the_agent(registry):
    metrics.set_nbdkit_up("vm1", True)
    assert value("svmotion_migration_stalled", vm="vm1") == 0       # known VM: exported at 0
    metrics.set_stalled("vm1", True)
    assert value("svmotion_migration_stalled", vm="vm1") == 1
    old = disk_status("disk1")
    for key in ("throttle_seconds", "throttled_seconds"):     # a mirror node older than the throttle
        del old[key]
    metrics.register_plugin_collector(lambda: {"vm1": status_reply("vm1", [
        disk_status("disk0", throttle=0.004, throttled=1.25), old])})
    assert value("svmotion_guest_throttle_delay_seconds", vm="vm1", disk="disk0") == 0.004
    assert value("svmotion_guest_throttle_seconds_total", vm="vm1", disk="disk0") == 1.25
    assert value("svmotion_guest_throttle_seconds_total", vm="vm1", disk="disk1") is None
    assert value("svmotion_dirty_bytes", vm="vm1", disk="disk1") == 0


def test_a_malformed_or_failing_status_never_breaks_the_scrape(registry):
    good = disk_status("disk0", dirty=1)
    bad = disk_status("disk1", dirty=2)
    del bad["copied_bytes"]
    uneven = disk_status("disk2", latency=([0.001, 0.01], [1], 0.001, 1))
    metrics.register_plugin_collector(
        lambda: {"vm1": status_reply("vm1", [good, bad, uneven]), "vm2": None})
    assert value("svmotion_dirty_bytes", vm="vm1", disk="disk0") == 1
    assert value("svmotion_dirty_bytes", vm="vm1", disk="disk1") is None
    assert value("svmotion_dirty_bytes", vm="vm1", disk="disk2") is None

    def unreachable() -> dict:
        raise ConnectionRefusedError("vm1.ctl")
    metrics.register_plugin_collector(unreachable)  # replaces the first collector
    assert value("svmotion_dirty_bytes", vm="vm1", disk="disk0") is None
    assert value("svmotion_agent_up") == 1


def test_exposition_passes_promtool_check_metrics(served):
    promtool = need("promtool")
    metrics.set_nbdkit_up("vm1", True)
    metrics.set_phase("vm1", "CopyDirtyData")
    metrics.observe_stun("vm1", "mirror_install", "optimized", 0.0007, 0.0004)
    metrics.observe_phase("vm1", "DiskCopy", 2.0)
    metrics.count_pass("vm1")
    metrics.count_migration("vm1", "success")
    metrics.register_plugin_collector(lambda: {"vm1": status_reply("vm1", [
        disk_status("disk0", dirty=4096, errors={"dest:pwrite": 1},
                    latency=([0.001, 0.01], [3, 4], 0.004, 4))])})
    text = fetch(served)
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    names = sample_names(text)
    assert "svmotion_guest_write_latency_seconds_bucket" in names
    assert "svmotion_stun_duration_seconds_bucket" in names


def test_serve_answers_metrics_and_follows_reset(served):
    metrics.set_nbdkit_up("vm7", True)
    assert 'svmotion_nbdkit_up{vm="vm7"} 1.0' in fetch(served)
    metrics.reset()
    assert "vm7" not in fetch(served)


@pytest.mark.parametrize("addr", ["9815", "localhost", "host:port", "127.0.0.1:70000"])
def test_parse_addr_refuses_bad_addresses(addr):
    with pytest.raises(ValueError, match=f"metrics address '{addr}' is not host:port, e.g. 127.0.0.1:9815"):
        metrics.parse_addr(addr)


def test_parse_addr():
    assert metrics.parse_addr("127.0.0.1:9815") == ("127.0.0.1", 9815)
    assert metrics.parse_addr("[::1]:9815") == ("::1", 9815)
    assert metrics.parse_addr(":9815") == ("127.0.0.1", 9815)


def test_default_address_is_loopback_in_the_exporter_range():
    host, port = metrics.parse_addr(metrics.DEFAULT_ADDR)
    assert host == "127.0.0.1" and 9100 <= port <= 9999
