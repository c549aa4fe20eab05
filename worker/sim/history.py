"""How the simulator's history is generated: pure functions of ``(seed, chat id, day)``.

Day ``d`` (0-based from ``SIM_HISTORY_START``) holds a deterministic number of messages around
``SIM_MESSAGES_PER_DAY`` (a ``SIM_EMPTY_DAY_RATIO`` share of days is empty); their ids lie in
``[d*STRIDE + 1, d*STRIDE + STRIDE]``, increasing with time, with a few ids skipped
("deleted"), so ids stay below 2**31 for ~14 years of history. Nothing here keeps state:
:class:`worker.sim.world.World` caches what it generates, and :mod:`worker.sim.changes`
derives changed days from generated ones.
"""

from __future__ import annotations

import hashlib
import random

STRIDE = 400_009  # ids per day slot: > the largest SIM_MESSAGES_PER_DAY (400_000) plus gaps
DAY_S = 86_400
MAX_ID = 2**31 - 1
MAX_DAY = MAX_ID // STRIDE - 1  # ~14.7 years after SIM_HISTORY_START; later days stay empty


def _u64(*parts: object) -> int:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _unit(*parts: object) -> float:
    return _u64(*parts) / 2**64


def _signed64(value: int) -> int:
    return value - 2**64 if value >= 2**63 else value


class _Day:
    """The compact form of one day of one chat."""

    __slots__ = ("bits", "ids", "origin", "pos", "ts")

    def __init__(
        self,
        ids: list[int],
        ts: list[int],
        bits: list[int],
        origin: _Day | None = None,
        pos: list[int] | None = None,
    ) -> None:
        self.ids = ids
        self.ts = ts
        self.bits = bits
        # A changed day keeps the day it was generated as, and each message's position there
        # (-1: added), so that the messages left unchanged are built exactly as before.
        self.origin = origin
        self.pos = pos


def generated_count(
    seed: int, chat_id: int, day: int, messages_per_day: int, empty_day_ratio: float
) -> int:
    """How many messages day ``day`` is generated with (one hash, no message generated)."""
    if day < 0 or day > MAX_DAY or messages_per_day == 0:
        return 0
    if _unit("empty", seed, chat_id, day) < empty_day_ratio:
        return 0
    spread = 0.6 + 0.8 * _unit("count", seed, chat_id, day)
    return max(1, min(STRIDE - 2, round(messages_per_day * spread)))


def generate_day(seed: int, chat_id: int, day: int, n: int, start_ts: int) -> _Day:
    """The ``n`` messages of day ``day``: sorted ids in its slot, sorted times, random bits."""
    rng = random.Random(_u64("day", seed, chat_id, day))
    if not n:
        return _Day([], [], [])
    span = min(STRIDE, n + max(1, n // 50))
    base = day * STRIDE + 1
    ids = [base + k for k in sorted(rng.sample(range(span), n))]
    day_ts = start_ts + day * DAY_S
    ts = sorted(day_ts + rng.randrange(DAY_S) for _ in range(n))
    bits = [rng.getrandbits(64) for _ in range(n)]
    return _Day(ids, ts, bits)
