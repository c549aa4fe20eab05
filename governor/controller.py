"""The governor's rate controller: each tick, reads the bucket counters and the flood stream,
applies the pure policy (:mod:`governor.policy`) per class and per session, and writes the new
rates.

Two limits, learned apart: each session's own bucket (``session:<name>:<cls>:rate``) learns the
account's own limit from that account's own FloodWaits, and the fleet bucket of the class learns
the limit the accounts share, only from evidence that it is shared (:func:`policy.attribute`:
several sessions flooding close together while none runs at its own learned limit, a flood
while the fleet probes above its cruise, or a session refused well below a pace it kept
without a flood in the last ``SUSTAINED_LOOKBACK_S`` while the fleet bucket paced the class). A
FloodWait slows what it is evidence about, and nothing keeps a session above its own limit.

The rooms around it: :mod:`governor.measure` measures what the fleet really sent (admits minus
the slots booked ahead) over exactly ``MEASURE_WINDOW_S``, from counter samples taken every
``COUNTER_SAMPLE_S`` between ticks; :mod:`governor.floods` reads the flood stream and judges each
flood shared or own; :mod:`governor.memory` remembers per bucket the rate of the last flood (the
ceiling), the streak of cuts and whether the last flood came at a rate the ceiling had called
safe (the limit fell), and decides how deep each flood cuts (:func:`governor.memory.cut`). This
module puts them together and applies the decisions to the bucket.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace

from fleet.bucket import (
    SHARED_FLOOD_WINDOW_S,
    WINDOW_LOG_SECONDS,
    ClassRate,
    Counters,
    RateDefaults,
    TokenBucket,
    parse_window,
)
from fleet.gate import REQUEST_CLASSES
from fleet.scripts import text
from governor.floods import FloodLog, RawFlood
from governor.measure import (
    HISTORY_S,
    MEASURE_WINDOW_S,
    burst_start,
    got_through_before,
    keep,
    per_s,
    sustained,
)
from governor.measure import measured as measured_rate
from governor.memory import WINDOW_WAIT_S, BucketMemory, cut
from governor.policy import (
    SUSTAINED_LOOKBACK_S,
    Action,
    AimdParams,
    Decision,
    FloodSeen,
    decide,
    params_for,
    window_estimate,
)
from governor.settings import GovernorSettings

#: A session bucket admitting at least this share of its rate counts as saturated (there is no
#: per-session wait counter; a session that uses its whole rate is what "saturated" means).
SESSION_SATURATION = 0.9
#: The fleet bucket counts as saturated when callers waited for it *and* it admitted at least
#: this share of its rate (a few waits at a burst edge do not make a busy bucket).
FLEET_SATURATION = 0.8
#: ... and its rate is below this share of the sum of the own rates of the sessions that sent:
#: a fleet bucket at (or above) what its callers' own buckets allow together cannot be what
#: paces them, however often its burst edge makes one wait.
FLEET_BINDS = 0.99


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
class RateController:
    """Reads the bucket's counters each tick and sets new rates with :func:`policy.decide`.

    Fleet buckets (one per request class) are always governed. A session's own bucket gets a
    per-session override (``set_rate(scope="session:<name>")``) once it has flooded, since the
    hidden limits are per account; from then on it is cut and raised like the fleet's.
    """

    bucket: TokenBucket
    settings: GovernorSettings
    _samples: deque[Counters] = field(default_factory=lambda: deque(maxlen=512))
    _memory: dict[tuple[str, str], BucketMemory] = field(default_factory=dict)
    _last_tick: Counters | None = None  # what the previous tick read
    _floods: FloodLog = field(default_factory=FloodLog)

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
        self._floods.reset()

    async def sample(self) -> None:
        """Read the counters between ticks (only to measure rates; nothing is decided)."""
        if self.settings.rate_limit_strategy == "adaptive":
            keep(self._samples, await self.bucket.counters())

    async def tick(self) -> list[RateChange]:
        if self.settings.rate_limit_strategy != "adaptive":
            return []  # RATE_LIMIT_STRATEGY=fixed: the configured rates stay as they are
        now = await self.bucket.counters()
        raw_rates = {
            text(k): text(v)
            for k, v in (await self.bucket.redis.hgetall(self.bucket.keys.rates)).items()
        }
        prev, self._last_tick = self._last_tick, now
        keep(self._samples, now)
        floods = await self._floods.read(self.bucket.redis, self.bucket.keys.floods)
        if prev is None or now.at_s <= prev.at_s:
            return []
        changes: list[RateChange] = []
        for fc in REQUEST_CLASSES:
            c: str = fc
            if floods.get(c):
                ended = await self._end_probe(c, now, raw_rates)
                if ended is not None:
                    changes.append(ended)
            events = floods.get(c, [])
            shared, own = self._attribute(c, now, events, await self._bookings(c, events))
            change = await self._fleet(c, now, prev, raw_rates, shared)
            if change is not None:
                changes.append(change)
            for session in _sessions_to_govern(now, prev, raw_rates, c, own):
                changes.extend(await self._session(session, c, now, prev, raw_rates, own))
        return changes

    async def _end_probe(
        self, c: str, now: Counters, raw_rates: dict[str, str]
    ) -> RateChange | None:
        """A flood came while the fleet bucket of ``c`` probed above its cruise: back to the
        cruise at once, before the flood is judged. The probe is what filled the window, and
        the fleet bucket hands the flooded worker's slots to the others at the same probe rate:
        held there for the half second judging takes, the window refused a second session
        (then the whole class was held) almost every time. The flood is still judged as met
        at the probe rate (``probe_from``)."""
        memory = self._memory.get(("fleet", c))
        if memory is None:
            return None
        current = _rate(raw_rates, f"fleet:{c}:rate", self.defaults.fleet[c])
        cruise = memory.probe_to_end(current, self.settings.aimd_recovery_margin)
        if cruise is None:
            return None
        memory.probe_from = current
        memory.last_probe_s = now.at_s  # no step before this one is judged and watched
        await self.bucket.set_rate(c, cruise, scope="fleet")  # type: ignore[arg-type]
        raw_rates[f"fleet:{c}:rate"] = repr(cruise)
        why = "a flood while probing: back to the cruise until it is judged"
        return RateChange("fleet", c, current, cruise, Decision(cruise, "cut", why))

    async def _fleet(
        self,
        c: str,
        now: Counters,
        prev: Counters,
        raw_rates: dict[str, str],
        shared: list[FloodSeen],
    ) -> RateChange | None:
        """The fleet bucket of class ``c``: cut only by shared floods, raised while saturated."""
        fleet_memory = self._memory.setdefault(("fleet", c), BucketMemory())
        current = _rate(raw_rates, f"fleet:{c}:rate", self.defaults.fleet[c])
        measured = self._measured(now, f"{c}:sent")
        admitted = now.get(f"{c}:admits") - prev.get(f"{c}:admits")
        waited = now.get(f"{c}:fleet_waits") - prev.get(f"{c}:fleet_waits")
        recent = admitted / (now.at_s - prev.at_s)
        own_sum = sum(
            _own_rate(raw_rates, session, c, self.defaults.session[c])
            for session in _sessions_sent(now, prev, c)
        )
        saturated = (
            waited > 0 and recent >= FLEET_SATURATION * current and current < FLEET_BINDS * own_sum
        )
        if saturated:
            fleet_memory.saturated_s = now.at_s
        estimate = 0.0
        wait_s = max((f.wait_s for f in shared), default=0.0)
        if shared:
            fleet_memory.shared = True
            at_s = max(f.at_s for f in shared)
            fleet_memory.provisional = not _paced(fleet_memory, min(f.at_s for f in shared))
            estimate = self._window_estimate(now, f"{c}:sent", fleet_memory, wait_s, at_s, c)
            # The rate when Telegram said "too much" (read as the flood came in; the flood
            # is judged a tick later, when the window has drained).
            measured = max(f.fleet_rate for f in shared)
            if fleet_memory.probe_from is not None:
                current = max(current, fleet_memory.probe_from)  # judged at the probe's rate
        pending = bool(self._floods.pending_sessions(c))
        if not pending:
            margin = self.settings.aimd_recovery_margin
            held = fleet_memory.probe_judged(now.at_s, shared=bool(shared), margin=margin)
            if held is not None and held > current:
                await self.bucket.set_rate(c, held, scope="fleet")  # type: ignore[arg-type]
                why = "the probe met only accounts' own limits: a margin below its last step"
                return RateChange("fleet", c, current, held, Decision(held, "raise", why))
        return await self._decide(
            "fleet", c, now.at_s, current, measured, saturated, len(shared),
            estimate=estimate, wait_s=wait_s, pending=pending,
        )  # fmt: skip

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
        # A flooded session is measured as the flood came in, not after its pause. Refused
        # just after its own pause, what it sent says nothing of a pace: measured at its
        # bucket's rate (a session paused by a N = 2 s flood, refused again by the fleet's
        # window on its first request after, read 0.5/s, and that flood, the second of a
        # streak, sent an account of 10/s to 0.47/s: 14% of its limit for the whole run).
        measured = max(
            (current if f.after_pause else f.own_rate for f in mine),
            default=self._measured(now, name),
        )
        saturated = per_s(now, prev, name) >= SESSION_SATURATION * current
        memory = self._memory.setdefault((f"session:{session}", c), BucketMemory())
        if saturated:
            memory.saturated_s = now.at_s
        wait_s = max((f.wait_s for f in mine), default=0.0)
        estimate = 0.0
        if mine:
            at_s = max(f.at_s for f in mine)
            memory.own_flood_s = max(at_s, memory.own_flood_s or at_s)
            estimate = self._window_estimate(now, name, memory, wait_s, at_s, c, session)
        change = await self._decide(
            f"session:{session}", c, now.at_s, current, measured, saturated, len(mine),
            estimate=estimate, wait_s=wait_s,
            pending=session in self._floods.pending_sessions(c),
            probe_answer=any(f.probe for f in mine),
        )  # fmt: skip
        if mine and change is not None and change.decision.action == "cut":
            # The ceiling this cut set was read on a burst from idle: an upper bound only.
            memory.limit_from_burst = all(f.from_idle for f in mine)
            if memory.limit_from_burst:
                why = f"{change.decision.why}; read on a burst from idle, an upper bound"
                change = replace(change, decision=replace(change.decision, why=why))
        changes = [] if change is None else [change]
        if memory.window_set is not None:
            probe = await self._window_probe(session, c, now, memory)
            if probe is not None:
                changes.append(probe)
        if mine and (wait_s >= WINDOW_WAIT_S or memory.window_set is not None):
            flood_at_s = max(f.at_s for f in mine)
            window = await self._own_window(session, c, now, name, memory, flood_at_s)
            if window is not None:
                changes.append(window)
        return changes

    async def _own_window(
        self, session: str, c: str, now: Counters, name: str, memory: BucketMemory, at_s: float
    ) -> RateChange | None:
        """A long FloodWait of one account: its own limit is a window (K requests per W s,
        bursts allowed), used as such (:meth:`TokenBucket.set_window`) instead of a rate that
        would smooth the burst away. The first one: K = the requests that got through since the
        window last freed, W = their span + N (N is rounded up, so W is never too short). A
        flood with a window already set: K was too many; K = what got through in the last W
        before it, and at least one less."""
        answered, seconds = memory.window_k, memory.window_s
        old = memory.window_set
        if old is None and (
            answered is None or seconds is None or not 0 < seconds <= WINDOW_LOG_SECONDS
        ):
            return None
        if old is not None:
            if memory.window_answered_s is not None and at_s <= memory.window_answered_s:
                return None  # a window probe's flood, answered by going back to what held
            k_old, w_old = old
            since = at_s - w_old
            base = self._samples[0]
            for sample in self._samples:
                if sample.at_s > since:
                    break
                base = sample
            got = self._got_through(now, name, base, c, at_s, session)
            answered, seconds = min(k_old - 1, got), max(w_old, seconds or 0.0)
        if answered is None or seconds is None or answered < 1:
            return None
        memory.window_set = (answered, seconds)
        memory.window_probe_from = memory.window_too_short = None
        await self.bucket.set_window(session, c, answered, seconds)  # type: ignore[arg-type]
        rate = answered / seconds
        why = f"own window: {answered} requests per {seconds:.3g} s, bursts allowed"
        return RateChange(f"session:{session}", c, rate, rate, Decision(rate, "cut", why))

    async def _window_probe(
        self, session: str, c: str, now: Counters, memory: BucketMemory
    ) -> RateChange | None:
        """An account's own window, probed shorter (:meth:`BucketMemory.window_probe`) once it
        went a quiet period full, and back to the window that held as soon as a flood of the
        account is read during the probe (however that flood is judged)."""
        assert memory.window_set is not None
        k_old, w_old = memory.window_set
        flooded = memory.window_probe_flooded(max(self._floods.flood_times(c, session) or [0.0]))
        if flooded is not None:
            k, w = flooded
            why = f"own window probe of {w_old:.3g} s flooded: back to {k} per {w:.3g} s"
        else:
            memory.window_probe_held(now.at_s)
            # Full: the account's admits (booked ones included) in the last W fill the window.
            inside = await self.bucket.redis.zcount(
                self.bucket.keys.window_log(session, c), (now.at_s - w_old) * 1e6, "+inf"
            )
            quiet_s = self.settings.aimd_quiet_seconds
            probe = memory.window_probe(now.at_s, full=inside >= k_old - 1, quiet_s=quiet_s)
            if probe is None:
                return None
            k, w = probe
            why = f"own window probe: {k} requests per {w:.3g} s (held {w_old:.3g} s)"
        await self.bucket.set_window(session, c, k, w)  # type: ignore[arg-type]
        action: Action = "raise" if w < w_old else "cut"
        decision = Decision(k / w, action, why)
        return RateChange(f"session:{session}", c, k_old / w_old, k / w, decision)

    async def _bookings(self, c: str, events: list[RawFlood]) -> dict[str, list[float]]:
        """The send times (s, ascending) of each flooded session's admits of class ``c`` from
        its window log, up to its latest flood just read: the last is the refused request."""
        out: dict[str, list[float]] = {}
        for session in sorted({e[1] for e in events}):
            until_s = max(e[0] for e in events if e[1] == session) + 0.001  # ids are in ms
            raw = await self.bucket.redis.zrangebyscore(
                self.bucket.keys.window_log(session, c),
                (until_s - SUSTAINED_LOOKBACK_S - MEASURE_WINDOW_S) * 1e6,
                until_s * 1e6,
                withscores=True,
            )
            out[session] = [float(entry[1]) / 1e6 for entry in raw]
        return out

    def _attribute(
        self,
        c: str,
        now: Counters,
        events: list[RawFlood],
        bookings: dict[str, list[float]],
    ) -> tuple[list[FloodSeen], dict[str, list[FloodSeen]]]:
        """Split the floods of class ``c`` old enough to judge into shared evidence and each
        session's own (:meth:`FloodLog.judge`), each measured as it came in: an account on its
        window log up to the refused request (``bookings``), the fleet on the counters."""

        fleet = self._memory.get(("fleet", c), BucketMemory())

        def own_rates(at_s: float, session: str) -> tuple[float, float | None, float | None, bool]:
            # What got through before Telegram said "too much": the bucket admitted the
            # refused requests too, and counting them puts the ceiling above the limit (for a
            # window of K requests, (K + 1) / W: 25% too high for K = 4). Second: the same
            # with a burst measured over at least the shared-flood window, to compare accounts.
            full = [b for b in bookings.get(session, []) if b <= at_s + 0.001]
            log = [b for b in full if b >= at_s - 2 * MEASURE_WINDOW_S]
            # It began sending inside the measuring window: its rate is over its burst's span.
            from_idle = len(full) >= 2 and full[0] >= full[-1] - MEASURE_WINDOW_S
            if log:
                since_s = log[-1] - MEASURE_WINDOW_S
                earlier = [
                    f for f in self._floods.refused(c, events, since_s=since_s)
                    if f[1] == session and f[0] < at_s
                ]  # fmt: skip
                rate = got_through_before(log, refused=len(earlier))
                if rate is not None:
                    company = got_through_before(
                        log, refused=len(earlier), min_span_s=SHARED_FLOOD_WINDOW_S
                    )
                    # The fastest it went without a flood lately: refused below that, the
                    # limit that refused it is not its own. Only since its own limit last
                    # spoke: a pace kept before a flood judged its own is what that limit has
                    # just refused (an account whose own limit fell from 6/s to 1/s, cut to
                    # 1.65/s by its first flood, was refused again there, "well below the 6/s
                    # it kept", and that second flood, taken for shared, cut the whole fleet).
                    taught = self._memory.get((f"session:{session}", c))
                    since = None if taught is None else taught.own_flood_s
                    if since is not None:
                        full = [b for b in full if b > since]
                    before = [f for f in self._floods.flood_times(c, session) if f < at_s]
                    kept = sustained(full, before, lookback_s=SUSTAINED_LOOKBACK_S)
                    return rate, company, kept, from_idle
            name = f"session:{session}:{c}:admits"
            return self._at_flood(now, name, c, events, session, spans=(1.0,)), None, None, False

        def seen(event: RawFlood) -> FloodSeen:
            at_s, session, seconds = event
            rate, company, kept, from_idle = own_rates(at_s, session)
            resumed = self._floods.resumed_at(c, session, at_s)
            taught = self._memory.get((f"session:{session}", c))
            return FloodSeen(
                at_s,
                session,
                seconds,
                own_rate=rate,
                # The limit its own floods taught it (None: it never flooded alone).
                own_limit=self._own_limit(session, c),
                fleet_rate=self._at_flood(now, f"{c}:sent", c, events),
                probe=fleet.probe_from is not None,
                own_paced=_paced(taught, at_s) and not _paced(fleet, at_s),
                company_rate=company,
                sustained=kept,
                fleet_paced=_paced(fleet, at_s),
                after_pause=resumed is not None and 0 <= at_s - resumed < MEASURE_WINDOW_S,
                limit_from_burst=taught is not None and taught.limit_from_burst,
                from_idle=from_idle,
            )

        return self._floods.judge(c, now.at_s, events, seen, fleet_shared=fleet.shared)

    def _own_limit(self, session: str, c: str) -> float | None:
        memory = self._memory.get((f"session:{session}", c))
        return None if memory is None else memory.ceiling

    def _window_estimate(
        self,
        now: Counters,
        name: str,
        memory: BucketMemory,
        wait_s: float,
        flood_at_s: float,
        c: str,
        session: str | None = None,
    ) -> float:
        """What a window-type limit allows, from the requests that got through since the window
        last freed (the previous flood's end, or the oldest sample) until the flood at
        ``flood_at_s`` (the refused ones of ``session``, or of the class, left out), and this
        flood's N."""
        start = max(self._samples[0].at_s, now.at_s - HISTORY_S)
        if memory.free_at_s is not None:
            start = max(start, memory.free_at_s)
        before = burst_start(self._samples, name, start)
        span = max(0.0, min(now.at_s, flood_at_s) - before.at_s)
        if not memory.note_window(flood_at_s, wait_s, span):
            return 0.0
        if wait_s < WINDOW_WAIT_S and span > 2 * MEASURE_WINDOW_S:
            # A short N and requests spread over more than two measuring windows: not a burst
            # from idle into a short window but a climb, and the estimate is diluted by it (one
            # account's first flood, N = 1 s, read 0.677/s against the 6.48/s it had just sent
            # and cut it there: 20% of its own limit for the run, `rise` seed 2).
            return 0.0
        answered = self._got_through(now, name, before, c, flood_at_s, session)
        if wait_s >= WINDOW_WAIT_S:
            memory.window_k = answered
        return window_estimate(answered, span, wait_s)

    def _got_through(
        self,
        now: Counters,
        name: str,
        base: Counters,
        c: str,
        until_s: float,
        session: str | None = None,
    ) -> int:
        """Requests counted under ``name`` since ``base`` that Telegram did not refuse: the
        floods of ``session`` (or of the class) from ``base`` until ``until_s`` left out."""
        refused = [
            f for f in self._floods.refused(c, [], since_s=base.at_s)
            if f[0] <= until_s and (session is None or f[1] == session)
        ]  # fmt: skip
        return now.get(name) - base.get(name) - len(refused)

    def _at_flood(
        self,
        now: Counters,
        name: str,
        c: str,
        events: list[RawFlood],
        session: str = "",
        spans: tuple[float, ...] = (1.0, 0.5),
    ) -> float:
        """The rate as a flood comes in, on what got through (the requests Telegram refused
        left out): for the fleet, the larger of the last MEASURE_WINDOW_S and its last half. A
        fleet still ramping up when Telegram says "too much" is at the limit now, not at the
        average of its ramp (12 workers starting read 11/s against a limit of 27/s, and the
        cut went to 8/s); the fleet bucket paces strictly, so its last second is no burst. An
        account is measured over the whole MEASURE_WINDOW_S only: its window allows bursts
        (4 requests in a second of a 4-per-2 s window read 4/s)."""
        rates = []
        for share in spans:
            window_s = MEASURE_WINDOW_S * share
            refused = self._floods.refused(c, events, since_s=now.at_s - window_s)
            n = sum(1 for e in refused if not session or e[1] == session)
            rates.append(measured_rate(self._samples, now, name, less=n, window_s=window_s))
        return max(rates)

    def _measured(self, now: Counters, name: str, *, refused: int = 0) -> float:
        """Per second over exactly the last MEASURE_WINDOW_S (:func:`governor.measure.measured`),
        less ``refused`` requests the bucket admitted but Telegram refused in that window."""
        return measured_rate(self._samples, now, name, less=refused)

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
        pending: bool = False,
        probe_answer: bool = False,
    ) -> RateChange | None:
        """One bucket's decision, applied. ``estimate`` is what a window-type limit allows
        (:func:`policy.window_estimate`) when the floods came with their N; 0 if unknown.
        ``pending``: a flood that concerns this bucket came and is not judged yet (no raise).

        No floor: a session's own bucket goes as low as its own floods say (a fair share of
        the fleet rate would keep an account with a low limit above it, flooding again).
        """
        memory = self._memory.setdefault((scope, c), BucketMemory())
        margin = self.settings.aimd_recovery_margin
        inputs = memory.inputs(now_s, current, measured, saturated, floods, margin)
        params = memory.adjust(self._params[("fleet" if scope == "fleet" else "session", c)])
        if memory.ceiling is not None:
            # Once a bucket has flooded, its steps are a share of the limit it found, not of
            # the configured rate: configured 5x too high, the fleet's probe stepped +26% and
            # every probe ended in a streak of cuts; an account 5x slower than the rate every
            # account starts from stepped +25% a tick and flooded at its first probe.
            step = memory.ceiling * self.settings.aimd_increase_fraction
            params = replace(params, increase_step=min(params.increase_step, step))
        decision = decide(inputs, params)
        if floods > 0:
            memory.last_flood_s = now_s
        if decision.action == "raise":
            if pending:
                return None  # a flood not judged yet says this rate may already be too much
            if scope == "fleet" and memory.probing(current, margin):
                gain = memory.probe_gain(now_s)
                if gain is None:
                    return None  # the last probe step is still being watched
                rate = params.clamp(current + (decision.rate - current) * gain)
                if rate > current:
                    memory.probed(now_s, current)
                decision = Decision(rate, "raise", f"{decision.why}; probe step x{gain:g}")
        if math.isclose(decision.rate, current, rel_tol=1e-9, abs_tol=1e-9):
            return None
        if decision.action == "cut":
            decision = cut(
                memory, decision, now_s=now_s, current=current, measured=measured,
                estimate=estimate, wait_s=wait_s, margin=margin,
                quiet_s=self.settings.aimd_quiet_seconds,
                decrease_factor=params.decrease_factor, probe_answer=probe_answer,
            )  # fmt: skip
        # An account that floods on its own gets no burst on top of its rate: near a short
        # window's limit the burst is what floods it (K per W admits at most rate × W + burst).
        burst = 1 if decision.action == "cut" and scope != "fleet" else None
        await self.bucket.set_rate(c, decision.rate, burst, scope=scope)  # type: ignore[arg-type]
        return RateChange(scope, c, current, decision.rate, decision)


def _paced(memory: BucketMemory | None, at_s: float) -> bool:
    """The bucket was seen saturated (what paced its callers) within the measuring window
    before ``at_s``."""
    saturated_s = None if memory is None else memory.saturated_s
    return saturated_s is not None and saturated_s >= at_s - MEASURE_WINDOW_S


def _rate(raw: dict[str, str], name: str, default: ClassRate | float) -> float:
    value = raw.get(name)
    if value:
        try:
            return float(value)
        except ValueError:
            pass
    return default.per_second if isinstance(default, ClassRate) else default


def _sessions_sent(now: Counters, prev: Counters, c: str) -> set[str]:
    """Sessions admitted a request of class ``c`` since ``prev``."""
    found: set[str] = set()
    suffix = f":{c}:admits"
    for name, value in now.values.items():
        if name.startswith("session:") and name.endswith(suffix) and value > prev.get(name):
            found.add(name.split(":")[1])
    return found


def _own_rate(raw: dict[str, str], session: str, c: str, default: ClassRate) -> float:
    """What one session's own bucket of class ``c`` admits per second: its window (K per W)
    if one is set, else its rate (its override, or the shared session rate)."""
    window = parse_window(raw.get(f"session:{session}:{c}:window", ""))
    if window is not None:
        return window[0] / window[1]
    return _rate(raw, f"session:{session}:{c}:rate", _rate(raw, f"session:{c}:rate", default))


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
    found = set(own) | _sessions_sent(now, prev, c)
    for name in raw_rates:
        parts = name.split(":")
        if len(parts) == 4 and parts[0] == "session" and parts[2] == c and parts[3] == "rate":
            found.add(parts[1])
    return sorted(found)
