"""promtool on grafana/: the scrape config, the alert rules and their unit tests.

The unit tests are themselves tested: each alert is replaced by one that always fires and by
one that never fires, and `promtool test rules` must then fail. That shows every alert has a
firing case and a not-firing case that would catch a broken rule.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from promlab import GRAFANA, need

RULES = GRAFANA / "svmotion.rules.yml"
ALERTS = [r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def promtool(*args: str, cwd: Path = GRAFANA) -> subprocess.CompletedProcess:
    return subprocess.run([need("promtool"), *args], cwd=cwd, capture_output=True, text=True)


def test_check_config():
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_rules():
    result = promtool("check", "rules", "svmotion.rules.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_rule_unit_tests_pass():
    result = promtool("test", "rules", "svmotion.rules.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_the_issue_asks_for_exists():
    assert set(ALERTS) == {"SvmotionStunOverBudget", "SvmotionMigrationNotConverging",
                           "SvmotionMigrationStalled", "SvmotionMigrationFailed", "SvmotionAgentDown",
                           "SvmotionNbdkitDown"}


def test_every_alert_is_unit_tested():
    tests = yaml.safe_load((GRAFANA / "svmotion.rules.test.yml").read_text())["tests"]
    cases = [c for t in tests for c in t["alert_rule_test"]]
    for alert in ALERTS:
        mine = [c for c in cases if c["alertname"] == alert]
        assert any(c["exp_alerts"] for c in mine), f"{alert} has no firing case"
        assert any(not c["exp_alerts"] for c in mine), f"{alert} has no not-firing case"


@pytest.mark.parametrize("alert", ALERTS)
@pytest.mark.parametrize("broken", ["vector(1)", "vector(1) < 0"], ids=["always", "never"])
def test_unit_tests_catch_a_broken_alert(alert, broken, tmp_path):
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == alert:
                rule["expr"] = broken
    (tmp_path / "svmotion.rules.yml").write_text(yaml.safe_dump(rules))
    shutil.copy(GRAFANA / "svmotion.rules.test.yml", tmp_path)
    result = promtool("test", "rules", "svmotion.rules.test.yml", cwd=tmp_path)
    assert result.returncode != 0, f"the unit tests did not notice {alert} = {broken}"
    assert alert in result.stdout + result.stderr
