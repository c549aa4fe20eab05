"""The Grafana dashboard, the alert rules and the Prometheus config name only metrics the code
exports (so a renamed metric cannot silently blank a panel or mute an alert)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from fleet.metrics import GOVERNOR_JOB, WORKER_JOB
from governor.metrics import GovernorMetrics
from worker.metrics import WorkerMetrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "telegram-fetcher.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDER = DEPLOY / "grafana" / "provisioning" / "dashboards" / "telegram-fetcher.yml"

#: Series the Pushgateway adds to every group by itself.
PUSHGATEWAY_OWN = {"push_time_seconds", "push_failure_time_seconds"}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (no functions, labels or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals ($variables included)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:$])[A-Za-z_:][\w:]*", text):
        word = match.group(0)
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if word.lower() in _KEYWORDS or word in ("by", "without"):
            continue
        names.add(word)
    return names


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return WorkerMetrics().names() | GovernorMetrics().names() | PUSHGATEWAY_OWN


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows keep their panels inside
    return [p for p in out if p.get("type") != "row"]


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    exprs = [
        (panel["title"], target["expr"])
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        text = query.get("query") if isinstance(query, dict) else query
        found = re.match(r"label_values\((.*),\s*\w+\)$", str(text or ""))
        if variable.get("type") == "query" and found:
            exprs.append((f"${variable['name']}", found.group(1)))
    return exprs


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        (
            'sum by (instance) (rate(messages_fetched_total{via="$via"}[$__rate_interval]))',
            {"messages_fetched_total"},
        ),
        (
            "histogram_quantile(0.95, sum by (le) (rate(token_wait_seconds_bucket[5m])))",
            {"token_wait_seconds_bucket"},
        ),
        ("max(a_b) > 10 and deriv(max(c)[30m:1m]) > 1e9", {"a_b", "c"}),
        ('time() - max by (instance) (push_time_seconds{job="x"})', {"push_time_seconds"}),
        ("absent(live_workers)", {"live_workers"}),
    ],
)
def test_metric_names_are_extracted_from_promql(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected


def test_exported_names_include_the_suffixes_prometheus_sees() -> None:
    names = WorkerMetrics().names()
    assert {"retries_total", "messages_fetched_total", "command_queue_length"} <= names
    assert {
        "fetch_duration_seconds_bucket",
        "fetch_duration_seconds_sum",
        "fetch_duration_seconds_count",
    } <= names
    assert "retries" not in names


def test_dashboard_is_a_provisionable_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "telegram-fetcher" and dashboard["title"]
    panels = _panels(dashboard)
    assert len(panels) >= 10
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    datasource_uid = re.search(r"uid:\s*(\S+)", DATASOURCE.read_text())
    assert datasource_uid is not None
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == datasource_uid.group(1)
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
    assert "/var/lib/grafana/dashboards" in PROVIDER.read_text()


def test_every_dashboard_query_names_an_exported_metric(
    dashboard: dict[str, Any], exported: set[str]
) -> None:
    unknown = {}
    seen: set[str] = set()
    for title, expr in _dashboard_exprs(dashboard):
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        seen |= names
        if names - exported:
            unknown[title] = sorted(names - exported)
    assert unknown == {}
    # What the issue asks the dashboard to show.
    assert {
        "command_queue_length",
        "messages_fetched_total",
        "bucket_rate_per_second",
        "flood_waits_total",
        "breaker_state",
        "retries_total",
        "fetch_lag_seconds",
        "dead_letters",
        "live_workers",
    } <= seen


# --------------------------------------------------------------------------------------------
# alert rules: parsed without PyYAML (not a dependency); cross-checked with it when present


def _scalar(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def parse_rules(text: str) -> list[dict[str, Any]]:
    """The rules of a Prometheus rule file written the way alerts.yml is: one rule per
    ``- alert:`` item, ``expr``/``for`` on one line, ``labels``/``annotations`` as maps."""
    rules: list[dict[str, Any]] = []
    section: str | None = None
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        stripped = line.strip()
        if stripped.startswith("- alert:"):
            rules.append(
                {"alert": _scalar(stripped.split(":", 1)[1]), "labels": {}, "annotations": {}}
            )
            section = None
            continue
        if not rules:
            continue
        key, _, value = stripped.partition(":")
        if key in ("labels", "annotations") and not value.strip():
            section = key
        elif key in ("expr", "for", "record"):
            section = None
            rules[-1][key] = _scalar(value)
        elif section is not None:
            rules[-1][section][key] = _scalar(value)
    return rules


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    return parse_rules(ALERTS.read_text())


def test_alert_file_parses_the_same_with_pyyaml_when_installed(
    rules: list[dict[str, Any]],
) -> None:
    yaml = pytest.importorskip("yaml")
    document = yaml.safe_load(ALERTS.read_text())
    full = [rule for group in document["groups"] for rule in group["rules"]]
    assert [(r["alert"], r["expr"], r["for"]) for r in full] == [
        (r["alert"], r["expr"], r["for"]) for r in rules
    ]


def test_alert_rules_are_complete(rules: list[dict[str, Any]]) -> None:
    assert len(rules) >= 6
    assert "expr: |" not in ALERTS.read_text() and "expr: >" not in ALERTS.read_text()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule.get("expr"), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), rule["alert"]
        assert rule["labels"].get("severity") in {"critical", "warning", "info"}
        assert rule["annotations"].get("summary"), rule["alert"]


def test_every_alert_names_an_exported_metric(
    rules: list[dict[str, Any]], exported: set[str]
) -> None:
    unknown = {r["alert"]: sorted(metric_names(r["expr"]) - exported) for r in rules}
    assert {k: v for k, v in unknown.items() if v} == {}
    covered = set().union(*(metric_names(r["expr"]) for r in rules))
    # breaker open > N min, flood rate, queue growing, no live worker, stale lag, dropped logs
    assert {
        "breaker_state",
        "flood_waits_total",
        "command_queue_length",
        "live_workers",
        "fetch_lag_seconds",
        "log_records_dropped_total",
    } <= covered


def test_prometheus_scrapes_the_pushgateway_with_honor_labels() -> None:
    text = PROMETHEUS.read_text()
    jobs = re.split(r"\n  - job_name:", text)
    pushgateway = next(j for j in jobs if j.lstrip().startswith("pushgateway"))
    assert re.search(r"^\s+honor_labels: true$", pushgateway, re.M)
    assert "alerts.yml" in text
    for job in (WORKER_JOB, GOVERNOR_JOB):
        assert f"job_name: {job}" in text
    # every path is tagged, which the dashboard's $via variable and the alerts rely on
    assert "via: pushgateway" in text and text.count("via") >= 4
