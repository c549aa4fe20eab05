"""The README's first command, `make demo`, runs a whole local fleet and reports success.

One run serves every test of this module (a demo fleet takes about a minute): `make demo` as the
README writes it, from a fresh clone whose .env is .env.example. Each test reads what that run
printed and left on disk; none of them changes it.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class DemoRun:
    clone: Path
    proc: subprocess.CompletedProcess[str]

    @property
    def data(self) -> Path:
        return self.clone / "data"

    def output(self) -> str:
        return self.proc.stdout[-3000:] + self.proc.stderr[-3000:]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """`make demo` on a fresh clone whose .env is .env.example. One deviation, for this machine
    only: the clone's .venv is this test's environment (and `make -o` keeps make from
    reinstalling into it), instead of a new one built by pip."""
    clone = tmp_path_factory.mktemp("demo") / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=60)
    (clone / ".venv").symlink_to(Path(sys.prefix))
    (clone / ".env").write_text((clone / ".env.example").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "TELEGRAM_"))}
    env["PYTHONPATH"] = str(clone)  # the editable install points at the main checkout
    _measure_the_clone(env, clone)
    proc = subprocess.run(
        ["make", "-o", ".venv/.installed", "demo"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    return DemoRun(clone, proc)


def _measure_the_clone(env: dict[str, str], clone: Path) -> None:
    """Under ``pytest --cov`` the demo's processes count toward this checkout's coverage (they
    run its HEAD commit): coverage's subprocess configuration (``COVERAGE_PROCESS_CONFIG``, its
    serialized config) also names the clone's packages as sources, and
    ``[tool.coverage.paths]`` maps the clone's files onto the checkout's when combining."""
    raw = env.get("COVERAGE_PROCESS_CONFIG")
    if raw is None:
        return
    try:
        config = json.loads(base64.b64decode(raw))
    except ValueError:  # coverage changed how it passes its settings on: measure as before
        return
    if not isinstance(config, dict) or not config.get("source"):
        return  # no source named: coverage measures everything, the clone included
    config["source"] = [
        *config["source"],
        *(str(clone / p) for p in ("fleet", "worker", "governor")),
    ]
    env["COVERAGE_PROCESS_CONFIG"] = base64.b64encode(json.dumps(config).encode()).decode()


@pytest.mark.timeout(300)
def test_make_demo_works_on_a_fresh_clone_with_the_example_env(demo: DemoRun) -> None:
    assert demo.proc.returncode == 0, demo.output()
    assert "exit codes 0, 0, 0, 0" in demo.proc.stdout
    assert len(sorted(demo.data.rglob("discussions_*.json"))) == 11


@pytest.mark.timeout(300)
def test_demo_fleet_completes_every_command_and_stops_cleanly(demo: DemoRun) -> None:
    stdout = demo.proc.stdout
    assert demo.proc.returncode == 0, demo.output()
    assert "!!" not in stdout
    assert "exit codes 0, 0, 0, 0" in stdout
    files = sorted(demo.data.rglob("discussions_*.json"))
    assert len(files) == 11
    for path in files:
        doc = json.loads(path.read_text())
        assert doc["message_count"] == len(doc["messages"])
    assert not (demo.data / "etc").exists()
    # It shows the governor's work and leaves nothing behind but the day files and progress.
    assert "what the governor did" in stdout and "each worker's share" in stdout
    assert "rates settled on: fleet" in stdout
    assert not list(demo.data.rglob("*.lock"))
    assert not (demo.data / "private_club").exists()
    assert "worker dead-letters (" not in stdout  # no hint that needs the demo's Redis
