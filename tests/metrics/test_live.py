"""A real Prometheus scraping a real agent during a real migration under a random writer.

One migration (module-scoped: it is the expensive part) feeds every check of issue 3 that
needs live data: promtool on the exposition taken mid-migration, the stun histogram, the
dirty-bytes series and the VM's phase read back through Prometheus' HTTP API, every dashboard
and rule selector against the agent's own scrape, and the PNG report of the `--report` file.

Processes: the agent (tests/agentproc.py, shared with the agent and kernel tests) and
Prometheus are started here and stopped by PID; the agent is asked to `shutdown` with stop_vms
so it stops its nbdkit, and the nbdkit its pid file names is stopped by PID (if that very
process still runs) as a last resort.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
from agentproc import AgentPool, AgentProcess, cli_argv, free_tcp_port
from promlab import REPO, Prometheus, fetch, need, prometheus_running
from test_dashboard import missing_selectors
from test_report import check_png

from svlab.writer import PATTERN, VerifyingWriter, fill_pattern_image

pytestmark = pytest.mark.slow

DISK_SIZE = 48 * 2**20
COPY_RATE = "12M"        # bytes/s: the bulk copy lasts ~4 s, long enough to watch every phase
WRITER_RATE = 3 * 2**20  # bytes/s of guest writes: load, without starving the 2 shared cores


@dataclass
class LiveMigration:
    prom: Prometheus
    metrics_url: str
    record: dict
    report_path: Path
    agent: AgentProcess
    mid_exposition: str = ""
    phases_seen_live: set[str] = field(default_factory=set)
    started: float = 0.0
    ended: float = 0.0
    writer_errors: list[str] = field(default_factory=list)


def wait_ok(what: str, check, timeout: float, proc: subprocess.Popen | None = None,
            log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise AssertionError(f"waiting for {what} failed\n{tail}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[LiveMigration]:
    need("nbdkit")
    tmp = tmp_path_factory.mktemp("live")
    src, dest = tmp / "src", tmp / "dest"
    for d in (src, dest):
        d.mkdir()
    fill_pattern_image(src / "disk0.raw", "disk0", DISK_SIZE)
    pool = AgentPool()
    try:
        agent = AgentProcess(root=tmp, state=pool.state_dir("svm3-"), disks={"disk0": src / "disk0.raw"},
                             metrics=f"127.0.0.1:{free_tcp_port()}")
        agent.write_config()
        pool.add(agent)
        agent.start(wait_nbdkit=True)
        metrics_url = f"http://{agent.metrics}/metrics"
        wait_ok("the agent's /metrics", lambda: "svmotion_agent_up" in fetch(metrics_url, 1),
                30, agent.proc, agent.log)
        with prometheus_running(tmp / "prometheus", agent.metrics) as prom:
            prom.wait_for('up{job="svmotion"} == 1', lambda r: len(r) == 1)
            run = LiveMigration(prom, metrics_url, {}, tmp / "vm1.report.json", agent)
            migrate_under_load(run, dest)
            # one more scrape after the end, so Prometheus holds the final counters
            prom.wait_for('sum(svmotion_migrations_total{vm="vm1",result="success"})',
                          lambda r: bool(r) and float(r[0]["value"][1]) == 1)
            yield run
    finally:
        pool.close()


def migrate_under_load(run: LiveMigration, dest: Path) -> None:
    """Migrate vm1 under the writer, watching Prometheus and /metrics while it runs."""
    writer = VerifyingWriter({"disk0": run.agent.uri("disk0")},
                             initial={"disk0": PATTERN}, connections=2, queue_depth=4,
                             rate=WRITER_RATE, seed=3)
    writer.start()
    try:
        time.sleep(1.0)  # guest IO before the migration, as in life
        run.started = time.time()
        migrate = run.agent.cli_background("migrate", "vm1", "--dest", str(dest), "--rate", COPY_RATE,
                                           "--report", str(run.report_path), "--json")
        while migrate.poll() is None:
            for result in run.prom.query('svmotion_migration_phase{vm="vm1"} == 1'):
                run.phases_seen_live.add(result["metric"]["phase"])
            if not run.mid_exposition and "DiskCopy" in run.phases_seen_live:
                text = fetch(run.metrics_url)
                if 'svmotion_migration_phase{phase="DiskCopy",vm="vm1"} 1.0' in text:
                    run.mid_exposition = text
            time.sleep(0.3)
        out, err = migrate.communicate()
        run.ended = time.time()
        assert migrate.returncode == 0, f"migrate exited {migrate.returncode}: {err}\n{run.agent.log_text()}"
    finally:
        report = writer.stop()
    run.writer_errors = list(report.errors)
    assert report.writes > 0, "the writer wrote nothing: no load"
    run.record = json.loads(run.report_path.read_text())


def test_migration_succeeded_under_load(live):
    assert live.record["state"] == "success", live.record.get("error")
    assert live.writer_errors == []


def test_promtool_check_metrics_on_the_exposition_during_the_migration(live):
    assert live.mid_exposition, "no /metrics taken while the VM was in DiskCopy"
    check = subprocess.run([need("promtool"), "check", "metrics"], input=live.mid_exposition,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert 'svmotion_dirty_bytes{disk="disk0",vm="vm1"}' in live.mid_exposition


def test_prometheus_counts_both_stuns(live):
    kinds = sorted(s["kind"] for s in live.record["stuns"])
    assert kinds == ["mirror_install", "switchover"], kinds
    result = live.prom.query('sum by (kind, strategy) (svmotion_stun_duration_seconds_count{vm="vm1"})')
    counted = {(r["metric"]["kind"], r["metric"]["strategy"]): float(r["value"][1]) for r in result}
    assert counted == {("mirror_install", "optimized"): 1.0, ("switchover", "optimized"): 1.0}
    total = live.prom.query('sum(svmotion_stun_duration_seconds_count{vm="vm1"})')
    assert float(total[0]["value"][1]) == 2
    # the histogram holds the stun times the agent recorded
    sums = live.prom.query('sum(svmotion_stun_duration_seconds_sum{vm="vm1"})')
    expected = sum(float(s["duration_seconds"]) for s in live.record["stuns"])
    assert float(sums[0]["value"][1]) == pytest.approx(expected, rel=1e-6)
    inf = live.prom.query('sum(svmotion_stun_duration_seconds_bucket{vm="vm1",le="+Inf"})')
    assert float(inf[0]["value"][1]) == 2


def test_prometheus_has_the_dirty_bytes_series(live):
    data = live.prom.api("query_range", query='svmotion_dirty_bytes{vm="vm1",disk="disk0"}',
                         start=str(live.started - 2), end=str(time.time()), step="0.5")
    assert len(data["result"]) == 1, data
    values = [float(v) for _, v in data["result"][0]["values"]]
    assert len(values) >= 5
    assert max(values) > 2**20, "dirty bytes never rose: the bulk copy was not seen"
    assert values[-1] < max(values), "dirty bytes never fell"


def test_prometheus_knows_the_phase_of_the_vm(live):
    assert {"DiskCopy"} <= live.phases_seen_live, live.phases_seen_live
    data = live.prom.api("query_range", query='svmotion_migration_phase{vm="vm1"} == 1',
                         start=str(live.started - 2), end=str(time.time()), step="0.5")
    seen = {r["metric"]["phase"] for r in data["result"]}
    assert {"DiskCopy", "CopyDirtyData"} & seen, seen
    # after the migration no phase is current
    assert live.prom.query('svmotion_migration_phase{vm="vm1"} == 1') == []


def test_every_dashboard_and_rule_selector_is_in_the_live_scrape(live):
    assert missing_selectors(fetch(live.metrics_url)) == []


def test_no_alert_fires_after_a_good_migration(live):
    alerts = live.prom.api("alerts")["alerts"]
    assert [a for a in alerts if a["state"] == "firing"] == []


def test_png_report_of_the_real_migration(live, tmp_path):
    out = tmp_path / "vm1.png"
    argv = cli_argv(tmp_path / "unused.sock", "report", str(live.report_path), "--png", str(out))
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "stun switchover" in result.stdout
    check_png(out)


def test_a_legacy_migration_is_told_apart_by_strategy(live, tmp_path):
    # Runs last: it migrates vm1 again (now living on the first destination), with the legacy
    # strategy, and Prometheus keeps the two strategies' stuns apart.
    dest = tmp_path / "dest2"
    dest.mkdir()
    result = live.agent.cli("migrate", "vm1", "--dest", str(dest), "--stun-strategy", "legacy", "--json",
                            timeout=120)
    assert result.returncode == 0, result.stderr
    expr = 'sum by (kind, strategy) (svmotion_stun_duration_seconds_count{vm="vm1"})'
    want = {("mirror_install", "optimized"): 1.0, ("switchover", "optimized"): 1.0,
            ("mirror_install", "legacy"): 1.0, ("switchover", "legacy"): 1.0}
    live.prom.wait_for(expr, lambda r: {(x["metric"]["kind"], x["metric"]["strategy"]):
                                        float(x["value"][1]) for x in r} == want)
