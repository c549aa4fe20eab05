"""Label sets known in advance start at 0 (issue 12), and they are exactly the label values the
code records, so a panel's "0" and the first event's series are the same series."""

from __future__ import annotations

import ast
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fleet.gate import REQUEST_CLASSES
from governor.metrics import GovernorMetrics
from worker import errors
from worker.metrics import FETCH_ERROR_TYPES, RETRY_TARGETS, WorkerMetrics

ROOT = Path(__file__).resolve().parents[2]
#: Raised on purpose but never counted in fetch_errors_total: an invalid command is
#: commands_total{status="rejected"}, a shutdown is an interruption that goes back to the queue.
NOT_FETCH_ERRORS = {"CommandRejected", "ShutdownRequested"}


def _samples(registry: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()  # type: ignore[arg-type]
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _error_classes() -> dict[str, type[errors.FetchError]]:
    found: dict[str, type[errors.FetchError]] = {}
    todo: list[type[errors.FetchError]] = [errors.FetchError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def _recorded_error_types() -> set[str]:
    """What the worker's code can put in fetch_errors_total{type}: the type_name of every error
    class it instantiates (type_name is the class name), and the literal types it passes."""
    classes = _error_classes()
    instantiated: set[str] = set()
    literals: set[str] = set()
    for path in (ROOT / "worker").rglob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if isinstance(func, ast.Name) and name in classes:
                instantiated.add(name)
            typed: list[ast.AST] = []
            if name == "_finished" and len(node.args) >= 3:
                typed.append(node.args[2])  # (running, status, error_type, outcome)
            if name == "_count_failure" and len(node.args) >= 2:
                typed.append(node.args[1])
            if name == "labels":
                typed.extend(k.value for k in node.keywords if k.arg == "type")
            for arg in typed:
                for const in ast.walk(arg):
                    if isinstance(const, ast.Constant) and isinstance(const.value, str):
                        literals.add(const.value)
    return (instantiated - NOT_FETCH_ERRORS) | literals


def test_fetch_error_types_and_retry_delays_are_exported_at_zero_before_anything_happens() -> None:
    samples = _samples(WorkerMetrics().registry)
    for error_type in FETCH_ERROR_TYPES:
        assert samples[("fetch_errors_total", (("type", error_type),))] == 0.0, error_type
    for target in RETRY_TARGETS:
        assert samples[("last_retry_delay_seconds", (("target", target),))] == 0.0, target


def test_the_fetch_error_types_at_zero_are_the_ones_the_code_records() -> None:
    assert set(FETCH_ERROR_TYPES) == _recorded_error_types()
    assert len(FETCH_ERROR_TYPES) == len(set(FETCH_ERROR_TYPES))
    # type_name, what every recording site passes, is the class name.
    assert errors.RateLimited("m", 1.0).type_name == "RateLimited"
    assert errors.GapDetected("m").type_name == "GapDetected"


def test_the_retry_delay_targets_at_zero_are_the_ones_the_code_records() -> None:
    # worker/telegram.py records f"telegram_{request_class}", fleet/events.py "redis_publish".
    assert set(RETRY_TARGETS) == {f"telegram_{c}" for c in REQUEST_CLASSES} | {"redis_publish"}
    assert 'f"telegram_{target}"' in (ROOT / "worker" / "telegram.py").read_text()
    assert 'self.on_retry("redis_publish"' in (ROOT / "fleet" / "events.py").read_text()


def test_a_known_session_has_its_flood_counters_at_zero_and_a_flood_counts_on_them() -> None:
    metrics = GovernorMetrics()
    assert not [k for k in _samples(metrics.registry) if k[0] == "flood_waits_total"]
    metrics.know_session("acc1")
    metrics.know_session("acc1")  # sampled again: nothing changes
    floods = {k: v for k, v in _samples(metrics.registry).items() if k[0] == "flood_waits_total"}
    assert floods == {
        ("flood_waits_total", (("request_class", c), ("session", "acc1"))): 0.0
        for c in REQUEST_CLASSES
    }
    metrics.count_flood_wait("acc1", "history", 3.0)
    after = {k: v for k, v in _samples(metrics.registry).items() if k[0] == "flood_waits_total"}
    assert set(after) == set(floods)  # the flood landed on a child that existed at 0
    assert after[("flood_waits_total", (("request_class", "history"), ("session", "acc1")))] == 1


def test_known_sessions_obey_the_session_label_cap() -> None:
    metrics = GovernorMetrics(session_label_max=1)
    metrics.know_session("acc1")
    metrics.know_session("acc2")
    sessions = {
        dict(labels)["session"]
        for name, labels in _samples(metrics.registry)
        if name == "flood_waits_total"
    }
    assert sessions == {"acc1", "other"}
