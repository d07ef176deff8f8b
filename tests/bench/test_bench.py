"""The benchmark harness cannot rot: its arithmetic, its open-loop writer, and a tiny full run.

The writer is checked against a stall we cause ourselves with nbdkit's pause filter: requests
due while the server is paused must complete only after it resumes and carry the whole wait in
their latency (counted from their due time), and the writer must keep issuing on schedule.
The smoke run executes every case with tiny disks and checks that each produced figures; the
remote cases of issue 11 among them (a TLS export on 127.0.0.1, QEMU's mirror over TLS, two
network namespaces with a shaped link).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from benchmarks.loadgen import LoadGen, Trace
from benchmarks.procs import Service, nbd_uri
from benchmarks.report import Case, markdown
from benchmarks.stats import percentile, summarize

ROOT = Path(__file__).resolve().parents[2]
REMOTE_JUDGED = ["remote_bulk", "remote_strategies", "remote_switchover"]
REMOTE_REPORTED = ["qemu_tls_anchor", "remote_shaped"]   # figures beside each other, no target
ASYNC_JUDGED = ["async_slow_dest", "async_quarter"]


@pytest.fixture
def short_dir():
    """Unix socket paths must stay under 108 bytes; tmp_path can be longer."""
    path = tempfile.mkdtemp(prefix="svb-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_percentiles_are_nearest_rank():
    samples = sorted(float(i) for i in range(1, 101))
    assert percentile(samples, 50) == 50.0
    assert percentile(samples, 99) == 99.0
    s = summarize([3.0, 1.0, 2.0])
    assert (s["n"], s["median"], s["p99"], s["max"]) == (3, 2.0, 3.0, 3.0)
    assert math.isnan(summarize([])["median"])


def test_trace_window_arithmetic():
    # Three requests: one finished before the window, one spanning it, one due inside it.
    trace = Trace(due=[0.0, 1.0, 2.5], sent=[0.0, 1.0, 2.5], done=[0.5, 3.0, 2.6],
                  meta={"bs": 4096, "errors": 0})
    assert trace.max_wait(2.0, 2.8) == pytest.approx(2.0)   # the spanning one: 3.0 - 1.0
    assert trace.max_wait(0.0, 0.6) == pytest.approx(0.5)
    assert trace.completed_bytes(0.0, 2.7) == 2 * 4096
    assert trace.throughput(0.0, 4.0) == pytest.approx(3 * 4096 / 4.0)
    # A backlogged writer: due long before it was sent. Service time runs from the send.
    late = Trace(due=[0.0, 0.1], sent=[2.0, 2.2], done=[2.5, math.nan], meta={"bs": 4096, "errors": 0})
    assert late.service_times(1.0, 3.0) == pytest.approx([0.5])
    assert late.latencies(1.0, 3.0) == []


def _pause(control: str, command: bytes) -> None:
    """Send 'p' or 'r' to nbdkit's pause filter and wait for its upper-case acknowledgement."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(control)
        s.sendall(command)
        assert s.recv(1) == command.upper()


def test_loadgen_counts_a_server_stall_from_the_due_time(short_dir):
    sock, control = os.path.join(short_dir, "nbd.sock"), os.path.join(short_dir, "pause.ctl")
    server = Service("nbdkit-pause", ["nbdkit", "--foreground", "--exit-with-parent", "--unix", sock,
                                      "--filter=pause", "memory", "64M", f"pause-control={control}"],
                     sock, short_dir)
    rate, bs = 2_000_000, 4096   # about 490 requests/s
    with server:
        lg = LoadGen([nbd_uri(sock)], os.path.join(short_dir, "trace"), rate=rate, bs=bs, qd=4)
        with lg:
            time.sleep(0.3)
            paused = time.monotonic()
            _pause(control, b"p")
            time.sleep(0.4)
            _pause(control, b"r")
            resumed = time.monotonic()
            time.sleep(0.3)
            trace = lg.stop()
    assert trace.errors == 0 and trace.unfinished == 0
    stalled = [(due, done) for due, done in zip(trace.due, trace.done) if paused + 0.01 < due < resumed - 0.05]
    assert stalled, "no request fell due while the server was paused"
    # Every request due during the pause finished after the resume; its latency holds the wait.
    assert all(done >= resumed - 0.01 for _, done in stalled)
    assert trace.max_wait(paused, resumed) >= resumed - paused - 0.05
    # Open loop: the schedule went on during the stall, so the count matches rate x time.
    expected = (trace.meta["stopped"] - trace.meta["start"]) * rate / bs
    assert abs(len(trace.due) - expected) <= 5


@pytest.mark.slow
@pytest.mark.timeout(900)   # every case once: about 3 min idle, over 5 beside a suite and two CPU hogs
def test_quick_run_produces_every_case(short_dir, tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out),
                             "--workdir", short_dir], cwd=ROOT, capture_output=True, text=True,
                            timeout=840)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    cases = {c["id"]: c for c in data["cases"]}
    assert sorted(cases) == sorted([str(i) for i in range(1, 9)] + ASYNC_JUDGED + REMOTE_JUDGED + REMOTE_REPORTED)
    for case in cases.values():
        assert case["error"] is None, case["error"]
        assert case["rows"], f"case {case['id']} measured nothing"
        assert all(row["summary"]["n"] >= 1 for row in case["rows"]), case["id"]
        assert case["commands"], f"case {case['id']} states no command"
    # Every case with a target judged it from a measured number (REMOTE_REPORTED only report).
    for cid in ("1", "2", "3", "4", "5", "6", "7", "8", *ASYNC_JUDGED, *REMOTE_JUDGED):
        assert cases[cid]["verdicts"], f"case {cid} has no verdict"
        assert all(v["met"] in (True, False) for v in cases[cid]["verdicts"]), cases[cid]["verdicts"]
    summary = (out / "SUMMARY.md").read_text()
    for cid in cases:
        assert f"## {cid}. " in summary
    assert "python -m benchmarks --quick" in summary
    # Nothing of the run is left in its work directory.
    assert os.listdir(short_dir) == []


def test_summary_reads_only_its_own_run():
    """SUMMARY.md's reading comes from the run's own verdicts; no hand-written analysis of another
    run is embedded (a new run once printed 'case 5: 0.84x' under a table that measured 0.72x)."""
    case5 = Case("5", "Bulk copy rate, idle guest", "svmotion >= 0.8x nbdcopy")
    case5.add("svmotion bulk copy: rate", [1.842e9], "B/s")
    case5.verdict("svmotion bulk copy / nbdcopy (medians)", 0.72, 0.8, "higher", "ratio")
    case7 = Case("7", "Passthrough cost", "node >= 0.9x floor")
    case7.verdict("mirror node / floor", 0.93, 0.9, "higher", "ratio")
    broken = Case("8", "Scale", "dirty map", error="ServiceError: nbdkit exited")
    meta = {"command": "python -m benchmarks --out bench", "mode": "full", "seconds": 1.0,
            "env": {"date": "2026-12-06 07:00:00 UTC", "cpus": 2, "loadavg_at_start": ["1", "1", "1"]}}
    summary = markdown([case5, case7, broken], meta)
    reading = summary.split("## Reading this run", 1)[1].split("\n## ", 1)[0]
    missed, met = reading.split("Missed (1):")[1], reading.split("Met (1):")[1].split("Missed")[0]
    assert "case 5: svmotion bulk copy / nbdcopy (medians) = 0.720x (target >= 0.800x)" in missed
    assert "case 7: mirror node / floor = 0.930x" in met
    assert "case 8 (Scale): ServiceError: nbdkit exited" in reading.split("Not measured (1):")[1]
    assert "0.84x" not in summary
    analysis = (ROOT / "benchmarks" / "ANALYSIS.md").read_text()
    assert analysis.splitlines()[4] not in summary   # a line of the dated analysis
