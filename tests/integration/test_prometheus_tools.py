"""deploy/prometheus checked by Prometheus's own tool: the config and the rules load, and every
alert fires (and stays quiet) as its unit tests in alerts_test.yml say."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)"
)


def promtool(*args: str) -> str:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def test_promtool_accepts_the_prometheus_config_and_finds_the_rules() -> None:
    out = promtool("check", "config", "prometheus.yml")
    assert "1 rule files found" in out and "is valid prometheus config" in out


def test_promtool_accepts_every_alert_rule() -> None:
    alerts = (PROMETHEUS_DIR / "alerts.yml").read_text()
    count = alerts.count("- alert:")
    assert f"SUCCESS: {count} rules found" in promtool("check", "rules", "alerts.yml")


def test_every_alert_has_a_firing_and_a_quiet_unit_test_that_pass() -> None:
    alerts = (PROMETHEUS_DIR / "alerts.yml").read_text()
    cases = (PROMETHEUS_DIR / "alerts_test.yml").read_text()
    for line in alerts.splitlines():
        if "- alert:" in line:
            name = line.split(":", 1)[1].strip()
            tested = cases.split(f"alertname: {name}\n")
            assert len(tested) > 1, f"{name} has no unit test"
            after = [part.lstrip().split("\n", 1)[0] for part in tested[1:]]
            assert any(a.startswith("exp_alerts: []") for a in after), f"{name}: no quiet case"
            assert any(a == "exp_alerts:" for a in after), f"{name}: no firing case"
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")
