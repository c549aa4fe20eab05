"""The governor's rate controller: reads the bucket counters and the flood stream, applies the
pure policy (:mod:`governor.policy`) per class and per session, and writes the new rates.

Two limits, learned apart: each session's own bucket (``session:<name>:<cls>:rate``) learns the
account's own limit from that account's own FloodWaits, and the fleet bucket of the class learns
the limit the accounts share, only from evidence that it is shared (:func:`policy.attribute`:
several sessions flooding close together while none runs at its own learned limit, or a
session flooding below its own learned limit once the shared limit is known to bind). A
FloodWait slows what it is evidence about, and nothing keeps a session above its own limit.

It measures what the fleet really sent (admits minus the slots booked ahead) over exactly
``MEASURE_WINDOW_S``, from counter samples taken every ``COUNTER_SAMPLE_S`` between ticks, and
remembers per bucket the rate of the last flood (the ceiling), the streak of cuts and whether
the last flood came at a rate the ceiling had called safe (the limit fell). How each flood is
cut is :meth:`RateController._cut`; the policy itself is pure and tested on its own.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace

from fleet.bucket import SHARED_FLOOD_WINDOW_S, ClassRate, Counters, RateDefaults, TokenBucket
from fleet.gate import REQUEST_CLASSES
from fleet.scripts import text
from governor.policy import (
    AimdParams,
    Decision,
    FloodSeen,
    TickInputs,
    attribute,
    decide,
    params_for,
    window_estimate,
)
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
#: How far back the counter samples go: a window-type limit (K per W s) is measured over the
#: time since its window last freed, up to this long.
HISTORY_S = 90.0
#: A FloodWait at least this long comes from a window-type limit (K requests per W s, bursts
#: allowed): the bucket's rate becomes what the window allows (:func:`policy.window_estimate`)
#: instead of a cut of the burst's rate, and it probes no sooner than two windows later.
WINDOW_WAIT_S = 3.0
#: With a short N, the window estimate wins over the policy's cut only when it is below this ×
#: the cut: a burst far above the limit (a configuration 5× too high) measures a rate whose 0.7×
#: still floods, while a fleet that crept up on its limit measures the limit itself and its
#: window estimate is diluted by the slower climb before.
BURST_EVIDENCE = 0.5
#: A probe's flood measuring more than this × the last ceiling found headroom (the limit rose).
PROBE_HEADROOM = 1.05
#: Probes that find no headroom space out up to this × the configured probe quiet.
MAX_PROBE_BACKOFF = 4.0


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
    free_at_s: float | None = None  # when the window its last flood found full freed (flood + N)
    window_s: float | None = None  # a window-type limit's window, once one was seen
    shared: bool = False  # fleet buckets: a shared limit was seen to bind
    probe_backoff: float = 1.0  # × the probe quiet: doubled by each probe that found no headroom


@dataclass
class RateController:
    """Reads the bucket's counters each tick and sets new rates with :func:`policy.decide`.

    Fleet buckets (one per request class) are always governed. A session's own bucket gets a
    per-session override (``set_rate(scope="session:<name>")``) once it has flooded, since the
    hidden limits are per account; from then on it is cut and raised like the fleet's.
    """

    bucket: TokenBucket
    settings: GovernorSettings
    _samples: deque[Counters] = field(default_factory=lambda: deque(maxlen=512))
    _memory: dict[tuple[str, str], _Memory] = field(default_factory=dict)
    _last_tick: Counters | None = None  # what the previous tick read
    _flood_id: str | None = None  # the last flood stream entry read
    _recent: dict[str, list[FloodSeen]] = field(default_factory=dict)  # judged, per class
    _pending: dict[str, list[FloodSeen]] = field(default_factory=dict)  # not yet judged

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
                    slow_start_factor=s.governor_slow_start_factor,
                    # The fleet probes often: a shared limit that rose is the headroom the
                    # whole fleet gains. An account's own limit probes after three quiet
                    # periods: each own flood costs that worker its pause.
                    probe_quiet_s=s.governor_probe_quiet_seconds if scope == "fleet" else None,
                    probe_factor=s.governor_probe_factor if scope == "fleet" else 1.0,
                    relative_step=s.aimd_increase_fraction,
                )

    def reset(self) -> None:
        """Forget the baseline (a new term as leader starts from a fresh reading)."""
        self._samples.clear()
        self._memory.clear()
        self._last_tick = None
        self._flood_id = None
        self._recent.clear()
        self._pending.clear()

    async def sample(self) -> None:
        """Read the counters between ticks (only to measure rates; nothing is decided)."""
        if self.settings.rate_limit_strategy == "adaptive":
            self._keep(await self.bucket.counters())

    def _keep(self, now: Counters) -> None:
        self._samples.append(now)
        while len(self._samples) > 2 and self._samples[1].at_s <= now.at_s - HISTORY_S:
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
        floods = await self._read_floods()
        if prev is None or now.at_s <= prev.at_s:
            return []
        changes: list[RateChange] = []
        for fc in REQUEST_CLASSES:
            c: str = fc
            shared, own = self._attribute(c, now, floods.get(c, []))
            fleet_memory = self._memory.setdefault(("fleet", c), _Memory())
            current = _rate(raw_rates, f"fleet:{c}:rate", self.defaults.fleet[c])
            measured = self._measured(now, f"{c}:sent")
            admitted = now.get(f"{c}:admits") - prev.get(f"{c}:admits")
            waited = now.get(f"{c}:fleet_waits") - prev.get(f"{c}:fleet_waits")
            recent = admitted / (now.at_s - prev.at_s)
            saturated = waited > 0 and recent >= FLEET_SATURATION * current
            estimate = 0.0
            wait_s = max((f.wait_s for f in shared), default=0.0)
            if shared:
                fleet_memory.shared = True
                at_s = max(f.at_s for f in shared)
                estimate = self._window_estimate(now, f"{c}:sent", fleet_memory, wait_s, at_s)
                # The rate when Telegram said "too much" (read as the flood came in; the flood
                # is judged a tick later, when the window has drained).
                measured = max(f.fleet_rate for f in shared)
            change = await self._decide(
                "fleet", c, now.at_s, current, measured, saturated, len(shared),
                estimate=estimate, wait_s=wait_s,
            )  # fmt: skip
            if change is not None:
                changes.append(change)
            for session in _sessions_to_govern(now, prev, raw_rates, c, own):
                changes.extend(await self._session(session, c, now, prev, raw_rates, own))
        return changes

    async def _session(
        self,
        session: str,
        c: str,
        now: Counters,
        prev: Counters,
        raw_rates: dict[str, str],
        own: dict[str, list[FloodSeen]],
    ) -> list[RateChange]:
        """One session's own bucket: cut only by its own floods, raised when it is what binds."""
        shared_rate = _rate(raw_rates, f"session:{c}:rate", self.defaults.session[c])
        current = _rate(raw_rates, f"session:{session}:{c}:rate", shared_rate)
        name = f"session:{session}:{c}:admits"
        mine = own.get(session, [])
        # A flooded session is measured as the flood came in, not after its pause.
        measured = max((f.own_rate for f in mine), default=self._measured(now, name))
        saturated = _per_s(now, prev, name) >= SESSION_SATURATION * current
        memory = self._memory.setdefault((f"session:{session}", c), _Memory())
        wait_s = max((f.wait_s for f in mine), default=0.0)
        estimate = 0.0
        if mine:
            at_s = max(f.at_s for f in mine)
            estimate = self._window_estimate(now, name, memory, wait_s, at_s)
        change = await self._decide(
            f"session:{session}", c, now.at_s, current, measured, saturated, len(mine),
            estimate=estimate, wait_s=wait_s,
        )  # fmt: skip
        return [] if change is None else [change]

    async def _read_floods(self) -> dict[str, list[tuple[float, str, float]]]:
        """FloodWaits recorded since the last read, per class: (Redis time s, session, N)."""
        redis = self.bucket.redis
        key = self.bucket.keys.floods
        out: dict[str, list[tuple[float, str, float]]] = {}
        if self._flood_id is None:
            newest = await redis.xrevrange(key, count=1)
            self._flood_id = text(newest[0][0]) if newest else "0-0"
            return out
        entries = await redis.xrange(key, min=f"({self._flood_id}", count=1000) or []
        for entry_id, raw in entries:
            self._flood_id = text(entry_id)
            f = {text(k): text(v) for k, v in (raw or {}).items()}
            try:
                seconds = float(f.get("seconds") or 0)
            except ValueError:
                seconds = 0.0
            at_s = int(self._flood_id.split("-")[0]) / 1000
            out.setdefault(f.get("class", ""), []).append((at_s, f.get("session", ""), seconds))
        return out

    def _attribute(
        self, c: str, now: Counters, events: list[tuple[float, str, float]]
    ) -> tuple[list[FloodSeen], dict[str, list[FloodSeen]]]:
        """Split the floods of class ``c`` old enough to judge into shared evidence and each
        session's own.

        A flood is judged once ``SHARED_FLOOD_WINDOW_S`` has passed since it (the next tick):
        the first of several sessions' floods into one full shared window is read alone, and
        would otherwise be taken for its account's own. Its session is paused meanwhile.
        """
        pending = self._pending.setdefault(c, [])
        for at_s, session, seconds in events:
            pending.append(
                FloodSeen(
                    at_s,
                    session,
                    seconds,
                    own_rate=self._measured(now, f"session:{session}:{c}:admits"),
                    # The limit its own floods taught it (None: it never flooded alone).
                    own_limit=self._own_limit(session, c),
                    fleet_rate=self._measured(now, f"{c}:sent"),
                )
            )
        ready = [f for f in pending if f.at_s <= now.at_s - SHARED_FLOOD_WINDOW_S]
        self._pending[c] = [f for f in pending if f.at_s > now.at_s - SHARED_FLOOD_WINDOW_S]
        recent = [f for f in self._recent.get(c, []) if f.at_s >= now.at_s - 4 * MEASURE_WINDOW_S]
        flags = attribute(
            ready,
            [*recent, *self._pending[c]],
            shared_window_s=SHARED_FLOOD_WINDOW_S,
            fleet_shared=self._memory.get(("fleet", c), _Memory()).shared,
        )
        self._recent[c] = [*recent, *ready]
        shared = [f for f, is_shared in zip(ready, flags, strict=True) if is_shared]
        own: dict[str, list[FloodSeen]] = {}
        for f, is_shared in zip(ready, flags, strict=True):
            if not is_shared:
                own.setdefault(f.session, []).append(f)
        return shared, own

    def _own_limit(self, session: str, c: str) -> float | None:
        memory = self._memory.get((f"session:{session}", c))
        return None if memory is None else memory.ceiling

    def _window_estimate(
        self, now: Counters, name: str, memory: _Memory, wait_s: float, flood_at_s: float
    ) -> float:
        """What a window-type limit allows, from the requests counted since the window last
        freed (the previous flood's end, or the oldest sample) until the flood at
        ``flood_at_s``, and this flood's N."""
        start = max(self._samples[0].at_s, now.at_s - HISTORY_S)
        if memory.free_at_s is not None:
            start = max(start, memory.free_at_s)
        before = self._samples[0]
        for sample in self._samples:
            if sample.at_s > start:
                break
            before = sample
        # Start where the counter first moved: idle time before the burst is not the window.
        for sample in self._samples:
            if sample.at_s <= before.at_s:
                continue
            if sample.get(name) > before.get(name):
                break
            before = sample
        span = max(0.0, min(now.at_s, flood_at_s) - before.at_s)
        first = memory.free_at_s is None
        memory.free_at_s = flood_at_s + wait_s
        if wait_s >= WINDOW_WAIT_S:
            memory.window_s = span + wait_s
        elif not first:
            # A short N after earlier floods: the window is about as long as the measuring
            # window, and the rate measured at the flood says more than a count diluted by
            # the pause and climb since the last one.
            return 0.0
        return window_estimate(now.get(name) - before.get(name), span, wait_s)

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
        estimate: float = 0.0,
        wait_s: float = 0.0,
    ) -> RateChange | None:
        """One bucket's decision, applied. ``estimate`` is what a window-type limit allows
        (:func:`policy.window_estimate`) when the floods came with their N; 0 if unknown.

        No floor: a session's own bucket goes as low as its own floods say (a fair share of
        the fleet rate would keep an account with a low limit above it, flooding again).
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
        if memory.probe_backoff > 1.0:
            params = replace(params, probe_quiet_s=params.probe_after_s * memory.probe_backoff)
        if memory.window_s is not None:
            # A window-type limit: probing sooner than two windows after the last flood only
            # buys a flood (the window still holds the requests that made the last one).
            probe_after = max(params.probe_after_s, 2 * memory.window_s)
            params = replace(params, probe_quiet_s=probe_after, quiet_period_s=probe_after)
        decision = decide(inputs, params)
        if floods > 0:
            memory.last_flood_s = now_s
        if math.isclose(decision.rate, current, rel_tol=1e-9, abs_tol=1e-9):
            return None
        if decision.action == "cut":
            decision = self._cut(
                memory, decision, now_s, since_cut, current, measured, estimate, wait_s
            )
        # An account that floods on its own gets no burst on top of its rate: near a short
        # window's limit the burst is what floods it (K per W admits at most rate × W + burst).
        burst = 1 if decision.action == "cut" and scope != "fleet" else None
        await self.bucket.set_rate(c, decision.rate, burst, scope=scope)  # type: ignore[arg-type]
        return RateChange(scope, c, current, decision.rate, decision)

    def _cut(
        self,
        memory: _Memory,
        decision: Decision,
        now_s: float,
        since_cut: float | None,
        current: float,
        measured: float,
        estimate: float = 0.0,
        wait_s: float = 0.0,
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
        old_target = self._ceiling(memory)
        # A flood met while probing above the cruise is the probe's answer, not one more cut of
        # a streak: counting it as one took a margin off the ceiling at every probe, and the
        # fleet ratcheted down probe after probe.
        probing = old_target is not None and current > old_target * margin * (1 + 1e-6)
        in_streak = (
            not probing and since_cut is not None and since_cut < self.settings.aimd_quiet_seconds
        )
        memory.suspect = (
            not in_streak and old_target is not None and current <= old_target * margin * (1 + 1e-6)
        )
        near_the_limit = in_streak or (old_target is not None and not memory.suspect)
        previous = memory.ceiling
        memory.streak = memory.streak + 1 if in_streak else 1
        memory.last_cut_s = now_s
        # What the fleet really sent when Telegram said "too much": the next climb stops a
        # margin below it.
        memory.ceiling = min(current, measured) if measured > 0 else current
        if previous is not None and not in_streak and not memory.suspect:
            # A probe's flood: if it found the limit where the last one was, probe half as
            # often (each probe costs a flood); if the limit had risen, as often as configured.
            found_more = memory.ceiling > previous * PROBE_HEADROOM
            backoff = min(MAX_PROBE_BACKOFF, 2 * memory.probe_backoff)
            memory.probe_backoff = 1.0 if found_more else backoff
        window = estimate > 0 and (
            wait_s >= WINDOW_WAIT_S or estimate < BURST_EVIDENCE * decision.rate
        )
        if window and not memory.suspect:
            # The FloodWait's N says what the window allows: the burst that filled it was
            # allowed (a window-type limit), or the rate measured over a burst far above the
            # limit would make a cut that still floods. Go to what the window allows.
            memory.ceiling = estimate
            return Decision(
                min(current, estimate * margin),
                "cut",
                f"{decision.why}; the window allows {estimate:.3g}/s (N = {wait_s:g} s)",
            )
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


def _sessions_to_govern(
    now: Counters,
    prev: Counters,
    raw_rates: dict[str, str],
    c: str,
    own: dict[str, list[FloodSeen]],
) -> list[str]:
    """Sessions whose own bucket of class ``c`` is governed this tick: those that flooded on
    their own, those that already have an override, and those that sent since ``prev`` (an
    account whose own bucket binds is raised, whatever the configured rate said)."""
    found: set[str] = set(own)
    suffix = f":{c}:admits"
    for name, value in now.values.items():
        if name.startswith("session:") and name.endswith(suffix) and value > prev.get(name):
            found.add(name.split(":")[1])
    for name in raw_rates:
        parts = name.split(":")
        if len(parts) == 4 and parts[0] == "session" and parts[2] == c and parts[3] == "rate":
            found.add(parts[1])
    return sorted(found)
