"""Settings: bad values fail at start with one readable line naming the key; every key is
documented in .env.example; secrets never print."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.settings import ConfigError, FleetSettings, load_settings
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("REDIS_PORT", "seventy", "REDIS_PORT"),
        ("DAY_TIMEZONE", "Mars/Olympus", "DAY_TIMEZONE"),
        ("PARALLELISM_MAX", "0", "PARALLELISM_MAX"),
        ("TELEGRAM_BACKEND", "carrier-pigeon", "TELEGRAM_BACKEND"),
        ("TELEGRAM_SESSION", "../../etc/x", "TELEGRAM_SESSION"),
        ("SIM_FAULTS", "meteor", "SIM_FAULTS"),
        ("FETCH_STRATEGY", "random", "FETCH_STRATEGY"),
    ],
)
def test_wrong_value_names_the_key(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, key: str, value: str, fragment: str
) -> None:
    from worker.sim.settings import SimSettings

    monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        load_settings(SimSettings if key.startswith("SIM_") else WorkerSettings)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_legacy_strategy_names_are_accepted(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FETCH_STRATEGY", "sequential")
    assert load_settings(WorkerSettings).fetch_strategy == "per_day"


def test_dotenv_file_is_read(clean_env: Path) -> None:
    (clean_env / ".env").write_text("PARALLELISM_MAX=3\nDAY_TIMEZONE=Europe/Moscow\n")
    s = load_settings(WorkerSettings)
    assert s.parallelism_max == 3 and s.day_timezone == "Europe/Moscow"


def test_secrets_do_not_print_and_are_listed(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TELEGRAM_API_HASH", "0123456789abcdef0123456789abcdef")
    monkeypatch.setenv("TELEGRAM_PHONE", "+15550001111")
    monkeypatch.setenv("REDIS_URL", "redis://user:hunter2secret@redis.example:6380/0")
    s = load_settings(WorkerSettings)
    text = repr(s) + str(s)
    for secret in ("0123456789abcdef0123456789abcdef", "+15550001111", "hunter2secret"):
        assert secret not in text
        assert secret in s.secret_values()
    assert s.redis_display() == "redis://redis.example:6380/0"


def test_secret_is_not_echoed_in_a_config_error(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:pw-shouldnt-show@x:notaport/0")
    monkeypatch.setenv("REDIS_PORT", "nope")
    with pytest.raises(ConfigError) as info:
        load_settings(WorkerSettings)
    assert "pw-shouldnt-show" not in str(info.value)


def test_metrics_mode_defaults_to_both_in_production(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_settings(FleetSettings).effective_metrics_mode == "scrape"
    monkeypatch.setenv("ENVIRONMENT", "production")
    assert load_settings(FleetSettings).effective_metrics_mode == "both"


def test_every_setting_is_documented_in_env_example() -> None:
    documented = set(
        re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M)
    )
    fields: set[str] = set()
    for cls in _settings_classes():
        fields |= {name.upper() for name in cls.model_fields}
    missing = sorted(fields - documented)
    assert not missing, f"undocumented settings in .env.example: {missing}"


def _settings_classes() -> list[type]:
    from governor.settings import GovernorSettings
    from worker.sim.settings import SimSettings

    return [FleetSettings, WorkerSettings, GovernorSettings, SimSettings]


def test_cli_exits_78_with_one_line_on_bad_configuration(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "PARALLELISM_MAX": "lots",
        "HOME": str(tmp_path),
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "fetch", "--chat", "@ru_python"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 78
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "PARALLELISM_MAX" in lines[0]


# --- every documented key is a setting that the code reads ------------------------------------

SETTINGS_MODULES = ("fleet/settings.py", "worker/settings.py", "governor/settings.py")
SIM_SETTINGS = "worker/sim/settings.py"


_KEY = re.compile(r"^#?\s*([A-Z][A-Z0-9_]+)=", re.M)
#: .env.example ends with two sections the programs do not read: Compose's ${…} variables and
#: the test suite's switches. Each has its own reader check below.
_COMPOSE_MARK = "# --- Docker Compose"
_TESTS_MARK = "# --- tests"


def _sections() -> tuple[str, str, str]:
    text = (ROOT / ".env.example").read_text()
    programs, rest = text.split(_COMPOSE_MARK, 1)
    compose, tests = rest.split(_TESTS_MARK, 1)
    return programs, compose, tests


def _documented_keys() -> list[str]:
    return _KEY.findall(_sections()[0])


def test_every_documented_compose_variable_is_used_by_the_compose_file_or_the_image() -> None:
    used = (ROOT / "docker-compose.yml").read_text() + (ROOT / "Dockerfile").read_text()
    unused = [k for k in _KEY.findall(_sections()[1]) if not re.search(rf"\b{k}\b", used)]
    assert not unused, f"Compose variables in .env.example that nothing uses: {unused}"


def test_every_documented_test_switch_is_read_by_the_tests() -> None:
    code = "\n".join(p.read_text() for p in sorted((ROOT / "tests").rglob("*.py")))
    unused = [k for k in _KEY.findall(_sections()[2]) if f'"{k}"' not in code]
    assert not unused, f"test switches in .env.example that no test reads: {unused}"


def _owner(key: str) -> tuple[type, tuple[str, ...]]:
    """The model that declares ``key`` (the most general one) and the packages that may read it:
    shared settings anywhere, the worker's and the simulator's in worker/ (worker/backend.py
    builds the simulator from its settings), the governor's in governor/."""
    from governor.settings import GovernorSettings
    from worker.sim.settings import SimSettings

    name = key.lower()
    if name in FleetSettings.model_fields:
        return FleetSettings, ("fleet", "worker", "governor")
    if name in WorkerSettings.model_fields:
        return WorkerSettings, ("worker",)
    if name in GovernorSettings.model_fields:
        return GovernorSettings, ("governor",)
    if name in SimSettings.model_fields:
        return SimSettings, ("worker",)
    raise AssertionError(f"{key} is documented in .env.example but no settings model has it")


def _derived_readers() -> dict[str, set[str]]:
    """Field name → the settings methods/properties that read it (transitively), e.g.
    ``redis_url`` → ``redis_dsn``: code that calls ``settings.redis_dsn()`` reads REDIS_URL.
    Validators are not readers (nothing calls them but pydantic)."""
    import ast

    direct: dict[str, set[str]] = {}
    for rel in (*SETTINGS_MODULES, SIM_SETTINGS):
        tree = ast.parse((ROOT / rel).read_text())
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef)):
                decorators = {ast.unparse(d).split("(")[0] for d in fn.decorator_list}
                if decorators & {"field_validator", "model_validator"}:
                    continue
                for node in ast.walk(fn):
                    if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "self":
                        direct.setdefault(node.attr, set()).add(fn.name)
    readers: dict[str, set[str]] = {}
    for field in direct:
        seen, todo = {field}, [field]
        while todo:
            for method in direct.get(todo.pop(), set()):
                if method not in seen:
                    seen.add(method)
                    todo.append(method)
        readers[field] = seen
    return readers


def _code(packages: tuple[str, ...]) -> str:
    skip = {ROOT / rel for rel in (*SETTINGS_MODULES, SIM_SETTINGS)}
    return "\n".join(
        path.read_text()
        for package in packages
        for path in sorted((ROOT / package).rglob("*.py"))
        if path not in skip
    )


def test_every_documented_setting_is_read_by_the_component_that_declares_it() -> None:
    readers = _derived_readers()
    unread: list[str] = []
    for key in _documented_keys():
        model, packages = _owner(key)
        names = readers.get(key.lower(), {key.lower()}) | {key.lower()}
        code = _code(packages)
        if not any(re.search(rf"\.{re.escape(n)}\b", code) for n in names):
            unread.append(f"{key} ({model.__name__}, read through {sorted(names)})")
    assert not unread, f"documented in .env.example but read by no code: {unread}"
