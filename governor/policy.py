"""The governor's rate policy: additive increase, multiplicative decrease (pure, no I/O).

Lessons this encodes (docs: ANCHORS.md, "Adapting to FloodWait"):

- On a FloodWait cut to ``decrease_factor`` (0.7) × the rate *measured* over the last 1–2 s,
  not the configured one: the configured rate may be far above what the fleet really sends,
  and cutting it would take several floods to bite.
- Fewer, deeper cuts: one cut per tick however many floods arrived, and none within
  ``cut_cooldown_s`` of the last cut (those floods answer requests sent at the old rate).
- Raise only while the bucket is saturated (callers waited for it) and no flood was seen for
  ``quiet_period_s``: raising an idle bucket's rate only stores up a burst for later.
- Remember the ceiling: the rate measured when the last flood came. After a cut the rate climbs
  back quickly (``recovery_speed`` of the way per tick, no quiet period) to ``recovery_margin``
  × that ceiling, which is below the rate that flooded, and cruises there: closing in on the
  ceiling floods again once the bucket's burst comes on top. It probes higher (additively) only
  after ``PROBE_QUIET_FACTOR`` quiet periods, so a limit that really rose is still found.
  Without this memory each cut costs a long slow climb at 70–85% of the limit.
- Configured rates are a first guess: a bucket that never flooded and is saturated grows
  multiplicatively (``slow_start_factor`` per tick, TCP's slow start), so a configuration 5× too
  low is left behind within seconds; once a flood has set a ceiling, probes above it grow by
  ``probe_factor`` per tick after ``probe_quiet_s`` without a flood, so a limit that rose is
  found within a few ticks.
- Always within ``[min_rate, max_rate]``.

Learned apart (issue 10): each session's own limit and the fleet's shared limit are separate
buckets with separate memories; :func:`attribute` decides which one a FloodWait is evidence
about, and :func:`window_estimate` turns a FloodWait's N into the rate a window-type limit
(K requests per W s) allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Action = Literal["cut", "raise", "hold"]

#: Above the rate of the last flood, probe only after this many quiet periods without a flood:
#: a limit that really rose is still found, without a flood every cycle.
PROBE_QUIET_FACTOR = 3.0


@dataclass(frozen=True, slots=True)
class AimdParams:
    min_rate: float
    max_rate: float
    decrease_factor: float = 0.7
    increase_step: float = 0.5
    quiet_period_s: float = 10.0
    cut_cooldown_s: float = 2.0
    recovery_margin: float = 0.97
    recovery_speed: float = 0.5
    #: × per tick while saturated with no flood ever seen (1.0: additive steps instead).
    slow_start_factor: float = 1.0
    #: Probing above the last flood starts after this long without one (None: 3 quiet periods).
    probe_quiet_s: float | None = None
    #: × per tick while probing (1.0: one additive step per tick).
    probe_factor: float = 1.0
    #: Additive steps are at least this × the current rate (0: the configured step only), so a
    #: bucket that started 5× too low does not climb in steps 5× too small.
    relative_step: float = 0.0

    def __post_init__(self) -> None:
        if not (0 < self.min_rate <= self.max_rate < math.inf):
            raise ValueError("AIMD bounds need 0 < min_rate <= max_rate < inf")
        if not 0 < self.decrease_factor < 1:
            raise ValueError("AIMD decrease_factor must be in (0, 1)")
        if not (0 <= self.increase_step < math.inf):
            raise ValueError("AIMD increase_step must be >= 0")
        if not (self.quiet_period_s >= 0 and self.cut_cooldown_s >= 0):
            raise ValueError("AIMD periods must be >= 0")
        if not (0 < self.recovery_margin <= 1 and 0 < self.recovery_speed <= 1):
            raise ValueError("AIMD recovery margin and speed must be in (0, 1]")
        if not (1.0 <= self.slow_start_factor < math.inf and 1.0 <= self.probe_factor < math.inf):
            raise ValueError("slow start and probe factors must be >= 1")
        if not 0 <= self.relative_step < 1:
            raise ValueError("relative_step must be in [0, 1)")
        if self.probe_quiet_s is not None and not self.probe_quiet_s >= 0:
            raise ValueError("probe_quiet_s must be >= 0")

    def step(self, current: float) -> float:
        """One additive step from ``current``."""
        return max(self.increase_step, current * self.relative_step)

    @property
    def probe_after_s(self) -> float:
        if self.probe_quiet_s is not None:
            return self.probe_quiet_s
        return PROBE_QUIET_FACTOR * self.quiet_period_s

    def clamp(self, rate: float) -> float:
        if math.isnan(rate):
            return self.min_rate
        return min(self.max_rate, max(self.min_rate, rate))


@dataclass(frozen=True, slots=True)
class TickInputs:
    """What the governor observed for one bucket since its last tick.

    ``measured_rate``: requests/s admitted over the last 1–2 s. ``saturated``: callers waited
    for this bucket. ``seconds_since_flood`` / ``seconds_since_cut``: ``None`` if never.
    ``ceiling``: the rate measured when the last flood came (``None`` if never).
    ``ceiling_suspect``: that flood came at a rate an earlier ceiling had said was safe (the
    limit itself fell): climb back one additive step per tick, so the next flood, if any,
    comes just above the new limit and measures it, instead of overshooting it again.
    """

    current_rate: float
    measured_rate: float
    saturated: bool
    floods: int
    seconds_since_flood: float | None = None
    seconds_since_cut: float | None = None
    ceiling: float | None = None
    ceiling_suspect: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    rate: float
    action: Action
    why: str


def decide(inputs: TickInputs, params: AimdParams) -> Decision:
    """The new rate for one bucket after one tick, with the reason (for the governor's log)."""
    current = params.clamp(inputs.current_rate)
    measured = inputs.measured_rate if math.isfinite(inputs.measured_rate) else 0.0
    if inputs.floods > 0:
        since_cut = inputs.seconds_since_cut
        if since_cut is not None and since_cut < params.cut_cooldown_s:
            return Decision(current, "hold", "flood within the cut cooldown")
        basis = min(current, measured) if measured > 0 else current
        new = min(current, params.clamp(basis * params.decrease_factor))
        return Decision(new, "cut", f"{inputs.floods} flood(s); measured {measured:.3g}/s")
    if not inputs.saturated:
        return Decision(current, "hold", "bucket not saturated")
    since_cut = inputs.seconds_since_cut
    cooled = since_cut is None or since_cut >= params.cut_cooldown_s
    if inputs.ceiling is not None and cooled:
        target = params.clamp(inputs.ceiling * params.recovery_margin)
        if current < target:
            if inputs.ceiling_suspect:
                step = params.step(current)
                why = f"climbing step by step toward {target:.3g}/s (the limit fell)"
            else:
                step = max(params.step(current), (target - current) * params.recovery_speed)
                why = f"recovering toward {target:.3g}/s (below the last flood)"
            return Decision(min(target, current + step), "raise", why)
    since_flood = inputs.seconds_since_flood
    if inputs.ceiling is None and params.slow_start_factor > 1.0 and cooled:
        # Never flooded: the configured rate was only a guess, grow fast until Telegram says.
        new = params.clamp(max(current * params.slow_start_factor, current + params.step(current)))
        if new <= current:
            return Decision(current, "hold", "saturated at max_rate")
        return Decision(new, "raise", "saturated, no flood seen yet: slow start")
    if since_flood is not None and since_flood < min(params.quiet_period_s, params.probe_after_s):
        return Decision(current, "hold", "saturated, but within the quiet period after a flood")
    if inputs.ceiling is not None and (
        since_flood is not None and since_flood < params.probe_after_s
    ):
        # Cruise just below the rate that flooded (with the bucket's burst on top, closing in
        # on it floods again); probe above it only now and then.
        return Decision(current, "hold", "cruising below the last flood; probing later")
    step = params.step(current)
    if inputs.ceiling is not None:
        step = max(step, current * (params.probe_factor - 1.0))
    new = params.clamp(current + step)
    if new <= current:
        return Decision(current, "hold", "saturated at max_rate")
    return Decision(new, "raise", "saturated and quiet")


def next_rate(inputs: TickInputs, params: AimdParams) -> float:
    """The new rate only (see :func:`decide`)."""
    return decide(inputs, params).rate


def params_for(
    configured_rate: float,
    *,
    min_rate: float,
    max_rate: float,
    decrease_factor: float = 0.7,
    increase_fraction: float = 0.05,
    quiet_period_s: float = 10.0,
    cut_cooldown_s: float = 2.0,
    recovery_margin: float = 0.97,
    recovery_speed: float = 0.5,
    slow_start_factor: float = 1.0,
    probe_quiet_s: float | None = None,
    probe_factor: float = 1.0,
    relative_step: float = 0.0,
) -> AimdParams:
    """Parameters for one bucket: the additive step is a fraction of its configured rate, so
    a 0.33/s resolve bucket and a 10/s history bucket recover in the same number of ticks."""
    low = min(min_rate, configured_rate)
    return AimdParams(
        min_rate=low,
        max_rate=max(max_rate, low),
        decrease_factor=decrease_factor,
        increase_step=configured_rate * increase_fraction,
        quiet_period_s=quiet_period_s,
        cut_cooldown_s=cut_cooldown_s,
        recovery_margin=recovery_margin,
        recovery_speed=recovery_speed,
        slow_start_factor=slow_start_factor,
        probe_quiet_s=probe_quiet_s,
        probe_factor=probe_factor,
        relative_step=relative_step,
    )


# --- learning two limits apart -----------------------------------------------------------------


def window_estimate(admitted: float, span_s: float, wait_s: float) -> float:
    """The rate a window-type limit allows, from one FloodWait.

    ``admitted`` requests went out over the last ``span_s`` seconds (since the bucket's window
    last freed: its previous flood's wait, or its first request) and Telegram then said "wait
    ``wait_s``". Had the bucket sent them spread over ``span_s + wait_s`` it would not have been
    refused: for K requests per W s sent from idle, the flood comes after K requests at
    ``span_s`` and the wait is what is left of the window, so this is exactly K / W. A burst the
    server allows is kept as a burst (the bucket's rate becomes K / W, not the burst's rate).
    """
    if admitted <= 0 or span_s + wait_s <= 0:
        return 0.0
    return admitted / (span_s + wait_s)


@dataclass(frozen=True, slots=True)
class FloodSeen:
    """One FloodWait as the governor read it from the flood stream."""

    at_s: float
    session: str
    wait_s: float
    own_rate: float  # the session's measured rate when it flooded (requests/s)
    own_limit: float | None  # the session's learned own limit, None if it never flooded alone
    fleet_rate: float = 0.0  # the class's measured fleet rate when it flooded
    #: The fleet bucket of its class was probing above its cruise when it came: it is the
    #: probe's answer (a shared limit just above the cruise), not the account's own limit.
    probe: bool = False
    #: The session's own bucket paced it (saturated) and the fleet bucket of its class did not
    #: (not saturated) when it came: the account was sending all its own bucket allowed.
    own_paced: bool = False
    #: What two floods' rates are compared on (:data:`COMPANY_RATE_RATIO`): ``own_rate`` with a
    #: burst that began inside the window measured over at least the shared-flood window
    #: (None: ``own_rate``). Two accounts that each sent ten requests within a few ms and were
    #: refused together read 1013/s and 270/s over their bursts' own spans, only because of how
    #: each sender was scheduled, and were taken for a slow account and a fast one.
    company_rate: float | None = None
    #: The highest rate the session sent without a flood over any measuring window in the
    #: ``SUSTAINED_LOOKBACK_S`` before this flood (None: no window fits).
    sustained: float | None = None
    #: The fleet bucket of its class paced the class (saturated) in the measuring window before
    #: it: a shared limit near the fleet's rate could have refused it.
    fleet_paced: bool = False
    #: The session's own pause after its previous flood (that flood + its N) ended less than a
    #: measuring window before this one: ``own_rate`` counts the pause, not a pace it kept.
    after_pause: bool = False
    #: ``own_limit`` was measured on the account's first burst from idle (it began sending
    #: inside the measuring window): requests over the burst's own span, an upper bound of its
    #: limit, not the limit (a slow start through 18 requests per 2 s read 12.8/s against 9/s).
    limit_from_burst: bool = False
    #: This flood's ``own_rate`` was itself measured on a burst from idle (see above).
    from_idle: bool = False


#: Two floods keep each other company (evidence of a shared window) only when their sessions ran
#: at comparable rates: a shared window that fills refuses whoever sends next, so a session far
#: slower than the others that floods as often as they do is meeting its own limit (an account
#: 5x slower than its fleet-mates, flooding at every turn, cut the whole fleet otherwise).
COMPANY_RATE_RATIO = 0.4
#: How far back a flooded session's own sending is searched for a faster pace it kept without a
#: flood (:attr:`FloodSeen.sustained`).
SUSTAINED_LOOKBACK_S = 20.0
#: A short-N flood of a session running below this share of a rate it sent without a flood
#: within ``SUSTAINED_LOOKBACK_S`` is not its own limit: the limit that refused it is shared.
BELOW_SUSTAINED = 0.8


def attribute(
    floods: list[FloodSeen],
    recent: list[FloodSeen],
    *,
    shared_window_s: float,
    fleet_shared: bool,
    at_own_limit: float = 0.8,
    window_wait_s: float = math.inf,
) -> list[bool]:
    """For each of ``floods``: True if it is evidence of the fleet's shared limit, False if it
    belongs to the session's own limit.

    A flood of a session running at ``at_own_limit`` × its own learned limit or above is its
    own: its own limit explains it. So is the flood of a session that never learned a limit
    alone, when its own bucket paced it and the fleet bucket did not (``own_paced``): accounts
    slow-starting their own buckets together (the first workers of a fleet, each sending all its
    bucket allows) meet their own limits at the same moment, and taken for a shared limit that
    cut the whole fleet to the pace of the two that had started (26 -> 7/s, 13 s to climb
    back). A shared limit met that way floods again once those accounts cruise below the limit
    their flood taught them, and is taken for shared then.

    A short-N flood of a session running below ``BELOW_SUSTAINED`` × a pace it kept without a
    flood within ``SUSTAINED_LOOKBACK_S`` (``sustained``), while the fleet bucket paced the
    class (``fleet_paced``), is shared, alone or not: its own limit let it send faster a moment
    ago, and the fleet ran at the rate a shared limit was last found at (an account
    refused 0.3 s after its pause, having sent 2.5/s over the window that included the pause,
    was cut from 13.5/s to 1.75/s by taking that for its own limit, and spent the run at 45%
    of it). With the fleet bucket idle it is the account's own limit that fell, and it slows
    that account only.

    Otherwise it is shared when another session (not itself at its own limit, running at a rate
    within ``COMPANY_RATE_RATIO`` of this one's) flooded within ``shared_window_s`` of it
    (``recent`` are earlier floods of the same class; several sessions flooding close together
    is a limit binding whichever sessions run), or it came while the fleet probed above its
    cruise (``probe``: the probe's answer; the probe ended at once, so no second session floods
    to keep it company). Otherwise a lone flood belongs to its session, even once a shared limit
    is known to bind (``fleet_shared``, kept for callers): an account whose own limit was
    learned too high floods below it at every turn, and taking each of those for the shared
    limit cut the whole fleet to that one account's pace.

    The same holds for an account whose only learned limit was read over its first burst
    from idle (``limit_from_burst``): that reading is an upper bound (the burst's own span,
    not the window's), so its next flood, at the limit itself, reads "well below" it. While
    its own bucket paces it and the fleet bucket does not, that flood is its own: two alike
    accounts refused that way together were taken for a shared limit and the whole fleet was
    cut to their pace (`hetero`, 84% in a third of the runs).

    A window-type flood (N >= ``window_wait_s``) of a session that never learned a limit alone
    is its own: accounts alike, started alike, fill their own windows of K per W at the same
    moment, and nothing in one such event tells that apart from one shared window. Taken as
    each account's own, a shared window is still kept (each account's window holds its share
    of it); taken as shared, own windows would pace every account at the fleet's K / W.
    """

    def below_sustained(f: FloodSeen) -> bool:
        return (
            f.fleet_paced
            and f.wait_s < window_wait_s
            and f.sustained is not None
            and f.own_rate < BELOW_SUSTAINED * f.sustained
        )

    def own(f: FloodSeen) -> bool:
        if below_sustained(f):
            return False
        if f.own_limit is None or (f.limit_from_burst and f.own_paced):
            return f.own_paced
        return f.own_rate >= at_own_limit * f.own_limit

    def comparable(f: FloodSeen, g: FloodSeen) -> bool:
        low, high = sorted(x.own_rate if x.company_rate is None else x.company_rate for x in (f, g))
        return high <= 0 or low >= COMPANY_RATE_RATIO * high

    pool = [*recent, *floods]
    out = []
    for f in floods:
        if own(f) or (f.wait_s >= window_wait_s and f.own_limit is None):
            out.append(False)
            continue
        company = (
            f.probe
            or below_sustained(f)
            or any(
                g.session != f.session
                and abs(g.at_s - f.at_s) <= shared_window_s
                and not own(g)
                and comparable(f, g)
                for g in pool
            )
        )
        out.append(company)
    return out
