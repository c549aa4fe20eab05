"""A real Redis on a free loopback port, for integration tests: a ``redis-server`` process
(the default), or with ``TEST_REDIS=docker`` a container started through testcontainers (image
``TEST_REDIS_IMAGE``, default ``redis:7``). Either can be killed and restarted on the same port
(with AOF: in the process's directory, or on a volume of the container) to test outages.
:func:`new_redis_server` picks the backend; :func:`backend_description` says which one is used.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any


def wait_ready(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 10.0
) -> None:
    """Until Redis answers PING (or NOAUTH) on 127.0.0.1:``port``; fails early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                reply = s.recv(64)
                if reply.startswith((b"+PONG", b"-NOAUTH")):
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError("redis did not become ready")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        password: str | None = None,
        appendonly: bool = False,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (run .ci/system-deps.sh)")
        self.binary = binary
        self.workdir = workdir
        self.port = port or free_port()
        self.password = password
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--daemonize",
            "no",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            "--loglevel",
            "warning",
            "--logfile",
            str(self.workdir / "redis.log"),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        wait_ready(self.port, self.proc)

    def kill(self) -> None:
        """SIGKILL, as a crash would; data survives only through AOF."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()


# --- the container backend ---------------------------------------------------------------

_DOCKER_PROBLEM: str | None = None  # why TEST_REDIS=docker fell back to a process, once known


def _testcontainers_env() -> None:
    # Read by testcontainers at import: the reaper image cannot be pulled where no registry is
    # reachable, and the engine's own address is the one ports are published on.
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
    os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")


class ContainerRedis:
    """The :class:`RedisServer` interface on a Redis container (testcontainers).

    The host port is fixed at creation, so ``kill()`` + ``start()`` (the same container again,
    its AOF on a bind-mounted volume) comes back on the same URL, as a crashed server would."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        password: str | None = None,
        appendonly: bool = False,
        image: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.password = password
        self.appendonly = appendonly
        self.image = image or os.environ.get("TEST_REDIS_IMAGE") or "redis:7"
        self.container: Any = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> ContainerRedis:
        if self.container is not None:  # after kill(): the same container, same data volume
            self.container.get_wrapped_container().start()
            wait_ready(self.port, timeout=30)
            return self
        _testcontainers_env()
        from testcontainers.core.container import DockerContainer

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o777)  # the image's redis user (uid 999 in redis:7) writes the AOF
        command = [
            "redis-server",
            "--protected-mode",
            "no",
            "--dir",
            "/data",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            "--loglevel",
            "warning",
        ]
        if self.password:
            command += ["--requirepass", self.password]
        container = (
            DockerContainer(self.image)
            .with_command(command)
            .with_bind_ports(6379, self.port)
            .with_volume_mapping(str(self.workdir), "/data", "rw")
        )
        container.start()
        self.container = container
        wait_ready(self.port, timeout=30)
        return self

    def kill(self) -> None:
        """SIGKILL to the server in the container, as a crash would; data survives through AOF."""
        if self.container is not None:
            wrapped = self.container.get_wrapped_container()
            wrapped.reload()
            if wrapped.status == "running":
                wrapped.kill()
                wrapped.wait(timeout=30)

    def stop(self) -> None:
        if self.container is not None:
            self.container.stop()  # stops and removes the container
            self.container = None

    def restart(self) -> None:
        self.kill()
        self.start()


def _docker_usable() -> str | None:
    """None when a Docker engine answers; otherwise why not (one line)."""
    global _DOCKER_PROBLEM
    if _DOCKER_PROBLEM is None:
        try:
            import docker

            client = docker.from_env()
            client.ping()
            image = os.environ.get("TEST_REDIS_IMAGE") or "redis:7"
            client.images.get(image)
            client.close()
            _DOCKER_PROBLEM = ""
        except Exception as exc:  # no engine, no socket, no image: all mean "use a process"
            _DOCKER_PROBLEM = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return _DOCKER_PROBLEM or None


def wants_docker() -> bool:
    return os.environ.get("TEST_REDIS", "").strip().lower() == "docker"


def backend_description() -> str:
    if not wants_docker():
        return "redis backend: local redis-server process (TEST_REDIS=docker for a container)"
    problem = _docker_usable()
    image = os.environ.get("TEST_REDIS_IMAGE") or "redis:7"
    if problem:
        return f"redis backend: local redis-server process (TEST_REDIS=docker, but {problem})"
    return f"redis backend: docker container {image} through testcontainers (TEST_REDIS=docker)"


def new_redis_server(
    workdir: Path, *, password: str | None = None, appendonly: bool = False
) -> RedisServer | ContainerRedis:
    """The Redis of the configured backend (not started)."""
    if wants_docker() and _docker_usable() is None:
        return ContainerRedis(workdir, password=password, appendonly=appendonly)
    return RedisServer(workdir, password=password, appendonly=appendonly)
