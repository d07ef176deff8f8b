"""The Grafana dashboard and provisioning files, and the selectors of dashboard and rules.

`missing_selectors()` is shared with the live test (test_live.py), which checks the same
selectors against the exposition of a real agent during a real migration.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml
from promlab import (GRAFANA, disk_status, fetch, prometheus_running, sample_names,
                      status_reply)
from promql import GRAFANA_VAR, Selector, grafana_exprs, rule_exprs, selectors

from agent import metrics

DASHBOARD = GRAFANA / "dashboards" / "svmotion.json"
# Series that Prometheus itself makes for each scrape target; not in any exposition.
SCRAPE_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def all_selectors() -> list[Selector]:
    exprs = grafana_exprs(json.loads(DASHBOARD.read_text()))
    exprs += rule_exprs(yaml.safe_load((GRAFANA / "svmotion.rules.yml").read_text()))
    return [s for e in exprs for s in selectors(e)]


def missing_selectors(exposition: str) -> list[str]:
    """Selectors of the dashboard and rules that match no sample of the exposition."""
    samples = sample_names(exposition)
    missing = []
    for sel in all_selectors():
        if sel.name in SCRAPE_SERIES:
            continue
        if not any(_matches(sel, labels) for labels in samples.get(sel.name, [])):
            missing.append(str(sel))
    return sorted(set(missing))


def _matches(sel: Selector, labels: dict[str, str]) -> bool:
    for label, op, want in sel.matchers:
        if GRAFANA_VAR in want:
            continue  # $vm and friends: any value can be selected
        have = labels.get(label, "")
        ok = {"=": have == want, "!=": have != want,
              "=~": re.fullmatch(want, have) is not None,
              "!~": re.fullmatch(want, have) is None}[op]
        if not ok:
            return False
    return True


def simulated_migration_exposition(url: str) -> str:
    """Drive every agent-side metric through one migration, per the contract, and scrape."""
    metrics.set_nbdkit_up("vm1", True)
    for phase in metrics.PHASES:
        metrics.set_phase("vm1", phase)
        metrics.observe_phase("vm1", phase, 0.01)
    metrics.observe_stun("vm1", "mirror_install", "optimized", 0.0008, 0.0005)
    metrics.count_pass("vm1")
    metrics.set_stalled("vm1", True)
    metrics.set_predicted_stun("vm1", 0.003)
    metrics.observe_stun("vm1", "switchover", "optimized", 0.004, 0.003)
    metrics.count_migration("vm1", "success")
    metrics.set_phase("vm1", "CopyDirtyData")
    metrics.register_plugin_collector(lambda: {"vm1": status_reply("vm1", [
        disk_status("disk0", dirty=65536, bulk=1 << 20, dirty_copied=4096, guest=8192,
                    dirtied=8192, errors={"dest:pwrite": 1},
                    latency=([0.001, 0.01], [3, 4], 0.004, 4), throttle=0.002, throttled=0.5)])})
    return fetch(url)


def test_selector_scanner_finds_names_and_matchers():
    found = selectors('sum by (vm) (rate(a_total{vm=~"$vm",le="0.05"}[5m])) > 1e3 '
                      'and on (vm) b offset 10m unless max(c{x!="y"})')
    assert [str(s) for s in found] == [f'a_total{{vm=~"{GRAFANA_VAR}",le="0.05"}}', "b{}",
                                       'c{x!="y"}']


def test_dashboard_and_rule_selectors_exist_in_a_scrape(served):
    text = simulated_migration_exposition(served)
    assert len(all_selectors()) > 20
    assert missing_selectors(text) == []


def test_missing_selector_is_reported(served):
    # the check itself can fail: a scrape without the plugin's families misses them
    metrics.set_nbdkit_up("vm1", True)
    missing = missing_selectors(fetch(served))
    assert f'svmotion_dirty_bytes{{vm=~"{GRAFANA_VAR}"}}' in missing
    assert 'svmotion_migrations_total{result="failed"}' not in missing  # exported at 0


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = " | ".join(p["title"] for p in panels).lower()
    for topic in ("stun duration by kind and strategy", "dirty bytes per disk", "throughput",
                  "guest write latency", "phase timeline", "migrations by result", "guest throttle",
                  "migration stalled"):
        assert topic in titles, f"no panel about {topic}"
    datasource = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "svmotion.yml").read_text())["datasources"][0]
    for panel in panels:
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    assert dash["uid"] == "svmotion"
    assert [v["name"] for v in dash["templating"]["list"]] == ["vm"]


def test_dashboard_provisioning_points_at_the_dashboard_dir():
    provider = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "svmotion.yml").read_text())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]
    datasource = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "svmotion.yml").read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"].startswith("http")


@pytest.mark.parametrize("expr", grafana_exprs(json.loads(DASHBOARD.read_text())))
def test_dashboard_queries_are_valid_promql(expr, prometheus_server):
    # a real Prometheus parses each query (Grafana's variables replaced by plain values)
    plain = (expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
             .replace("$__range", "1h").replace('"$vm"', '".*"'))
    prometheus_server.query(plain)  # raises on a parse error (HTTP 400)


@pytest.fixture(scope="module")
def prometheus_server(tmp_path_factory):
    """One Prometheus for the PromQL syntax checks (its target need not exist)."""
    with prometheus_running(tmp_path_factory.mktemp("prom"), "127.0.0.1:1") as prom:
        yield prom
