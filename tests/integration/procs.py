"""Start ``bucket_proc`` worker processes and release them at once (test helper)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[2]


class Procs:
    def __init__(self, configs: list[dict[str, Any]]) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "tests.integration.bucket_proc", json.dumps(c)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for c in configs
        ]

    async def release(self, client: aioredis.Redis, barrier: str) -> None:
        """Wait until every process is ready, then let them all go at once."""
        for _ in self.procs:
            got = await client.blpop([f"{barrier}:ready"], timeout=20)
            assert got is not None, self.failures()
        await client.rpush(f"{barrier}:go", *["go"] * len(self.procs))

    def results(self, timeout: float = 30) -> list[dict[str, Any]]:
        out = []
        for p in self.procs:
            stdout, stderr = p.communicate(timeout=timeout)
            assert p.returncode == 0, stderr.decode()
            out.append(json.loads(stdout.decode().strip().splitlines()[-1]))
        return out

    def failures(self) -> str:
        return "; ".join(
            p.stderr.read().decode() if p.stderr and p.poll() is not None else "running"
            for p in self.procs
        )

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
