"""``governor:leader``: the lease that makes one governor of many the leader.

The token is the governor's id plus a random suffix, held with a PX TTL of
``GOVERNOR_LEASE_SECONDS``; ``fleet/lua/lease.lua`` (the script of the worker and session leases
too) takes it with NX and extends it only while the token is still ours, so a governor that
stalled past its TTL steps down instead of fighting the new leader.
"""

from __future__ import annotations

import uuid

from redis.asyncio import Redis

from fleet.keys import Keys
from fleet.scripts import scripts_for, text


class LeaderLease:
    """``governor:leader``: take (NX), extend if ours (compare-and-extend), release if ours."""

    def __init__(self, redis: Redis, keys: Keys, owner: str, ttl_s: float) -> None:
        self.redis = redis
        self.key = keys.governor_leader
        self.token = f"{owner}:{uuid.uuid4().hex[:8]}"
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._scripts = scripts_for(redis)

    async def hold(self) -> bool:
        """True if we lead after this call (taken now or extended)."""
        lease = self._scripts.lease
        return int(await lease(keys=[self.key], args=[self.token, self.ttl_ms])) > 0

    async def release(self) -> bool:
        return int(await self._scripts.unlease(keys=[self.key], args=[self.token])) > 0

    async def holder(self) -> str | None:
        raw = await self.redis.get(self.key)
        return text(raw) if raw is not None else None
