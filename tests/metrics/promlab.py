"""Helpers of the metrics tests: contract-shaped plugin replies, HTTP fetch, a real Prometheus.

A module of its own (not conftest.py) so that test modules can import it by a unique name.
Every process started here is killed by its own PID when its context ends; Prometheus gets a
free loopback port and a storage directory under the caller's temporary directory.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest
from agentproc import free_tcp_port

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "grafana"


def disk_status(name: str, *, dirty: int = 0, bulk: int = 0, dirty_copied: int = 0,
                guest: int = 0, dirtied: int = 0, errors: dict | None = None,
                latency: tuple[list[float], list[int], float, int] | None = None,
                throttle: float = 0.0, throttled: float = 0.0) -> dict:
    """A DiskStatus as docs/interfaces.md section 2 defines it."""
    le, counts, total, count = latency or ([0.0001, 0.001, 0.01, 0.1], [0, 0, 0, 0], 0.0, 0)
    return {
        "name": name, "state": "mirroring", "path": f"/src/{name}.raw", "size": 1 << 30,
        "dest": f"/dst/{name}.raw", "mode": "sync", "granularity": 65536,
        "dirty_bytes": dirty, "copied_bytes": {"bulk": bulk, "dirty": dirty_copied},
        "dest_written_bytes": bulk + dirty_copied, "guest_written_bytes": guest,
        "dirtied_bytes": dirtied,
        "copy": {"running": False, "kind": None, "done_bytes": 0, "total_bytes": 0,
                 "rate_bps": 0, "error": None},
        "errors": errors or {},
        "write_latency": {"le": le, "counts": counts, "sum": total, "count": count},
        "throttle_seconds": throttle, "throttled_seconds": throttled, "throttled_requests": 0,
        "throttle_max_seconds": throttle, "async": None,
    }


def status_reply(vm: str, disks: list[dict]) -> dict:
    """A plugin `status` reply holding the given DiskStatus dicts."""
    return {"ok": True, "vm": vm, "stun": None, "stuns": [],
            "disks": {d["name"]: d for d in disks}}


def fetch(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def need(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        pytest.skip(f"{tool} not installed: run `make setup` (Debian package prometheus)")
    return path


class Prometheus:
    """A real Prometheus server on loopback, queried through its HTTP API."""

    def __init__(self, url: str, proc: subprocess.Popen) -> None:
        self.url = url
        self.proc = proc

    def api(self, path: str, **params: str) -> dict:
        query = urllib.parse.urlencode(params)
        body = json.loads(fetch(f"{self.url}/api/v1/{path}?{query}"))
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def wait_for(self, expr: str, ok: Callable[[list[dict]], bool], timeout: float = 30.0) -> list[dict]:
        """Poll an instant query until ok(result); fail with the last result."""
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if ok(result):
                return result
            time.sleep(0.5)
        raise AssertionError(f"{expr} never satisfied the condition; last result {result}")


@contextlib.contextmanager
def prometheus_running(workdir: Path, target: str) -> Iterator[Prometheus]:
    """A real Prometheus scraping host:port every second, rules loaded; killed by its PID."""
    binary = need("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_tcp_port()
    conf = workdir / "prometheus.yml"
    shutil.copy(GRAFANA / "svmotion.rules.yml", workdir / "svmotion.rules.yml")
    conf.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "rule_files: [svmotion.rules.yml]\n"
        "scrape_configs:\n  - job_name: svmotion\n"
        f"    static_configs:\n      - targets: ['{target}']\n")
    log_path = workdir / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={conf}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                fetch(f"{url}/-/ready", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("prometheus did not start: " + log_path.read_text()[-2000:])
                time.sleep(0.2)
        yield Prometheus(url, proc)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def sample_names(exposition: str) -> dict[str, list[dict[str, str]]]:
    """Sample name -> label sets of every sample in a text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    names: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            names.setdefault(sample.name, []).append(dict(sample.labels))
    return names
