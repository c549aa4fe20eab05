"""The governor's rate controller: reads the bucket counters, applies the pure policy
(:mod:`governor.policy`) per class and per flooded session, and writes the new rates.

It measures what the fleet really sent (admits minus the slots booked ahead) over exactly
``MEASURE_WINDOW_S``, from counter samples taken every ``COUNTER_SAMPLE_S`` between ticks, and
remembers per bucket the rate of the last flood (the ceiling), the streak of cuts and whether
the last flood came at a rate the ceiling had called safe (the limit fell). How each flood is
cut is :meth:`RateController._cut`; the policy itself is pure and tested on its own.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from fleet.bucket import ClassRate, Counters, RateDefaults, TokenBucket
from fleet.gate import REQUEST_CLASSES
from fleet.scripts import text
from governor.policy import AimdParams, Decision, TickInputs, decide, params_for
from governor.settings import GovernorSettings

#: Rates are measured over this long (ANCHORS: "0.7× the rate measured over 1–2 s").
MEASURE_WINDOW_S = 2.0
#: Between ticks the leader samples the counters this often, so the measured window starts
#: where it should (a flood's measurement must not reach back into a hold or a ramp-up).
COUNTER_SAMPLE_S = 0.25
#: A session bucket admitting at least this share of its rate counts as saturated (there is no
#: per-session wait counter; a session that uses its whole rate is what "saturated" means).
SESSION_SATURATION = 0.9
#: The fleet bucket counts as saturated when callers waited for it *and* it admitted at least
#: this share of its rate (a few waits at a burst edge do not make a busy bucket).
FLEET_SATURATION = 0.8
#: A session's own rate is kept at least this × its fair share of the fleet rate (see _decide).
SESSION_FAIR_SHARE_HEADROOM = 1.25


@dataclass(frozen=True, slots=True)
class RateChange:
    scope: str  # fleet | session:<name>
    request_class: str
    old: float
    new: float
    decision: Decision

    def line(self) -> str:
        return (
            f"rate {self.scope}:{self.request_class} {self.old:.4g} -> {self.new:.4g}/s "
            f"({self.decision.action}: {self.decision.why})"
        )


@dataclass
class _Memory:
    """What the controller remembers of one bucket between ticks (Redis time, seconds)."""

    last_flood_s: float | None = None
    last_cut_s: float | None = None
    ceiling: float | None = None  # the rate measured when the last cut was made
    streak: int = 0  # cuts in a row, each within a quiet period of the one before
    suspect: bool = False  # the last cut's flood came at a rate the ceiling said was safe


@dataclass
class RateController:
    """Reads the bucket's counters each tick and sets new rates with :func:`policy.decide`.

    Fleet buckets (one per request class) are always governed. A session's own bucket gets a
    per-session override (``set_rate(scope="session:<name>")``) once it has flooded, since the
    hidden limits are per account; from then on it is cut and raised like the fleet's.
    """

    bucket: TokenBucket
    settings: GovernorSettings
    _samples: deque[Counters] = field(default_factory=lambda: deque(maxlen=64))
    _memory: dict[tuple[str, str], _Memory] = field(default_factory=dict)
    _last_tick: Counters | None = None  # what the previous tick read (floods are diffed to it)

    def __post_init__(self) -> None:
        s = self.settings
        self.defaults = RateDefaults.from_settings(s)
        self._params: dict[tuple[str, str], AimdParams] = {}
        for scope, table in (("fleet", self.defaults.fleet), ("session", self.defaults.session)):
            for c, rate in table.items():
                self._params[(scope, c)] = params_for(
                    rate.per_second,
                    min_rate=s.fleet_rate_min_per_second,
                    max_rate=s.fleet_rate_max_per_second,
                    decrease_factor=s.aimd_decrease_factor,
                    increase_fraction=s.aimd_increase_fraction,
                    quiet_period_s=s.aimd_quiet_seconds,
                    cut_cooldown_s=s.aimd_cut_cooldown_seconds,
                    recovery_margin=s.aimd_recovery_margin,
                    recovery_speed=s.aimd_recovery_speed,
                )

    def reset(self) -> None:
        """Forget the baseline (a new term as leader starts from a fresh reading)."""
        self._samples.clear()
        self._memory.clear()
        self._last_tick = None

    async def sample(self) -> None:
        """Read the counters between ticks (only to measure rates; nothing is decided)."""
        if self.settings.rate_limit_strategy == "adaptive":
            self._keep(await self.bucket.counters())

    def _keep(self, now: Counters) -> None:
        self._samples.append(now)
        while len(self._samples) > 2 and self._samples[1].at_s <= now.at_s - 2 * MEASURE_WINDOW_S:
            self._samples.popleft()

    async def tick(self) -> list[RateChange]:
        if self.settings.rate_limit_strategy != "adaptive":
            return []  # RATE_LIMIT_STRATEGY=fixed: the configured rates stay as they are
        now = await self.bucket.counters()
        raw_rates = {
            text(k): text(v)
            for k, v in (await self.bucket.redis.hgetall(self.bucket.keys.rates)).items()
        }
        prev, self._last_tick = self._last_tick, now
        self._keep(now)
        if prev is None or now.at_s <= prev.at_s:
            return []
        base = self._measure_base(now)
        changes: list[RateChange] = []
        for fc in REQUEST_CLASSES:
            c: str = fc
            current = _rate(raw_rates, f"fleet:{c}:rate", self.defaults.fleet[c])
            measured = self._measured(now, f"{c}:sent")
            floods = now.get(f"{c}:floods") - prev.get(f"{c}:floods")
            admitted = now.get(f"{c}:admits") - prev.get(f"{c}:admits")
            waited = now.get(f"{c}:fleet_waits") - prev.get(f"{c}:fleet_waits")
            recent = admitted / (now.at_s - prev.at_s)
            saturated = waited > 0 and recent >= FLEET_SATURATION * current
            change = await self._decide("fleet", c, now.at_s, current, measured, saturated, floods)
            if change is not None:
                changes.append(change)
        fleet_now = {ch.request_class: ch.new for ch in changes}
        pairs = _flooded_or_overridden(now, prev, raw_rates)
        for session, sc in pairs:
            c = sc
            fleet_rate = fleet_now.get(c) or _rate(
                raw_rates, f"fleet:{c}:rate", self.defaults.fleet[c]
            )
            active = max(1, _active_sessions(now, base, c))
            shared = _rate(raw_rates, f"session:{c}:rate", self.defaults.session[c])
            current = _rate(raw_rates, f"session:{session}:{c}:rate", shared)
            measured = self._measured(now, f"session:{session}:{c}:admits")
            floods = now.get(f"session:{session}:{c}:floods") - prev.get(
                f"session:{session}:{c}:floods"
            )
            recent = _per_s(now, prev, f"session:{session}:{c}:admits")
            saturated = recent >= SESSION_SATURATION * current
            change = await self._decide(
                f"session:{session}",
                c,
                now.at_s,
                current,
                measured,
                saturated,
                floods,
                floor=SESSION_FAIR_SHARE_HEADROOM * fleet_rate / active,
            )
            if change is not None:
                changes.append(change)
        return changes

    def _measure_base(self, now: Counters) -> Counters:
        """The newest sample at least MEASURE_WINDOW_S old (else the oldest)."""
        base = self._samples[0]
        for sample in self._samples:
            if sample.at_s <= now.at_s - MEASURE_WINDOW_S:
                base = sample
        return base

    def _measured(self, now: Counters, name: str) -> float:
        """Per second over exactly the last MEASURE_WINDOW_S (or since the oldest sample).

        Samples come once a tick and at each flood, so the counter's value at the window's
        start is interpolated between the two samples around it: a window that is really
        1–2 ticks long would mix in a hold or a rate of before the last change.
        """
        start = max(self._samples[0].at_s, now.at_s - MEASURE_WINDOW_S)
        before = self._samples[0]
        value = float(before.get(name))
        for sample in self._samples:
            if sample.at_s <= start:
                before = sample
                value = float(sample.get(name))
                continue
            dt = sample.at_s - before.at_s
            share = (start - before.at_s) / dt if dt > 0 else 1.0
            value = before.get(name) + (sample.get(name) - before.get(name)) * share
            break
        # A fleet that only just began (idle for a whole window before the first request in
        # this one) is measured from the last sample before the counter moved, or one starting
        # at 30/s reads as 20/s. A pause after work (a hold) stays in: the window admitted it.
        earlier = [x for x in self._samples if x.at_s <= start - MEASURE_WINDOW_S]
        reference = earlier[-1] if earlier else self._samples[0]
        if reference.get(name) >= value:
            for sample in self._samples:
                if sample.at_s <= start:
                    continue
                if sample.get(name) > value:
                    break
                start = sample.at_s
        span = now.at_s - start
        if span <= 0:
            return 0.0
        return max(0.0, now.get(name) - value) / span

    def _ceiling(self, memory: _Memory) -> float | None:
        """The ceiling the policy recovers toward. Cuts in a row mean the limit fell and the
        rate measured at each flood still overshoots it: each cut of a streak takes one more
        recovery margin off, so the cascade after a drop ends sooner."""
        if memory.ceiling is None:
            return None
        return memory.ceiling * self.settings.aimd_recovery_margin ** max(0, memory.streak - 1)

    async def _decide(
        self,
        scope: str,
        c: str,
        now_s: float,
        current: float,
        measured: float,
        saturated: bool,
        floods: int,
        *,
        floor: float = 0.0,
    ) -> RateChange | None:
        """One bucket's decision, applied.

        A session's own rate never binds below ``floor``, a little above its fair share of the
        fleet rate: the fleet cut already slows it that far, a session measured while paused by
        its own FloodWait would otherwise be cut to almost nothing, and a session held below its
        share books its slots late and wastes the fleet's slots in between (the fleet bucket's
        TAT jumps to its booking). Cuts stop there; a session below it is raised back to it.
        """
        memory = self._memory.setdefault((scope, c), _Memory())
        since_cut = None if memory.last_cut_s is None else now_s - memory.last_cut_s
        if floods > 0:
            inputs = TickInputs(current, measured, saturated, floods, None, since_cut)
        else:
            since_flood = None if memory.last_flood_s is None else now_s - memory.last_flood_s
            inputs = TickInputs(
                current,
                measured,
                saturated,
                0,
                since_flood,
                since_cut,
                self._ceiling(memory),
                memory.suspect,
            )
        params = self._params[("fleet" if scope == "fleet" else "session", c)]
        decision = decide(inputs, params)
        if decision.action == "cut" and decision.rate < floor:
            decision = Decision(
                min(current, floor), "cut", f"{decision.why}; fair share of the fleet rate"
            )
        elif floods == 0 and decision.rate < floor and current < floor:
            decision = Decision(floor, "raise", "back to its fair share of the fleet rate")
        if floods > 0:
            memory.last_flood_s = now_s
        if math.isclose(decision.rate, current, rel_tol=1e-9, abs_tol=1e-9):
            return None
        if decision.action == "cut":
            decision = self._cut(memory, decision, now_s, since_cut, current, measured)
        await self.bucket.set_rate(c, decision.rate, scope=scope)  # type: ignore[arg-type]
        return RateChange(scope, c, current, decision.rate, decision)

    def _cut(
        self,
        memory: _Memory,
        decision: Decision,
        now_s: float,
        since_cut: float | None,
        current: float,
        measured: float,
    ) -> Decision:
        """Remember a cut, and decide how deep it goes.

        A flood that ends a quiet cruise at or below the recovery target means the limit
        itself fell (how far is unknown): the policy's deep cut stands and the climb back is
        step by step (``suspect``). So does the first flood ever. A flood in a streak (the fleet
        was already closing in on the limit after a cut) or while probing just above the last
        ceiling measured a rate that *is* the limit, near enough: the rate goes straight to the
        cruise a margin below it. The hold has drained the window already, and a 0.7× dip and
        climb back would only waste the fleet's slots.
        """
        margin = self.settings.aimd_recovery_margin
        in_streak = since_cut is not None and since_cut < self.settings.aimd_quiet_seconds
        old_target = self._ceiling(memory)
        memory.suspect = (
            not in_streak and old_target is not None and current <= old_target * margin * (1 + 1e-6)
        )
        near_the_limit = in_streak or (old_target is not None and not memory.suspect)
        memory.streak = memory.streak + 1 if in_streak else 1
        memory.last_cut_s = now_s
        # What the fleet really sent when Telegram said "too much": the next climb stops a
        # margin below it.
        memory.ceiling = min(current, measured) if measured > 0 else current
        ceiling = self._ceiling(memory)
        if near_the_limit and ceiling is not None and ceiling * margin > decision.rate:
            return Decision(
                min(current, ceiling * margin),
                "cut",
                f"{decision.why}; straight to the cruise below it",
            )
        return decision


def _rate(raw: dict[str, str], name: str, default: ClassRate | float) -> float:
    value = raw.get(name)
    if value:
        try:
            return float(value)
        except ValueError:
            pass
    return default.per_second if isinstance(default, ClassRate) else default


def _per_s(now: Counters, base: Counters, name: str) -> float:
    dt = now.at_s - base.at_s
    return max(0, now.get(name) - base.get(name)) / dt if dt > 0 else 0.0


def _active_sessions(now: Counters, base: Counters, c: str) -> int:
    """Sessions that were admitted requests of class ``c`` since ``base``."""
    suffix = f":{c}:admits"
    return sum(
        1
        for name, value in now.values.items()
        if name.startswith("session:") and name.endswith(suffix) and value > base.get(name)
    )


def _flooded_or_overridden(
    now: Counters, prev: Counters, raw_rates: dict[str, str]
) -> list[tuple[str, str]]:
    """(session, class) pairs that flooded since ``prev`` or already have an override."""
    found: set[tuple[str, str]] = set()
    for name, value in now.values.items():
        if name.startswith("session:") and name.endswith(":floods"):
            _, session, c, _ = name.split(":")
            if value > prev.get(name):
                found.add((session, c))
    for name in raw_rates:
        parts = name.split(":")
        if len(parts) == 4 and parts[0] == "session" and parts[3] == "rate":
            found.add((parts[1], parts[2]))
    return sorted(p for p in found if p[1] in REQUEST_CLASSES)
