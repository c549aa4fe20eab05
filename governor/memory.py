"""What the controller remembers of each bucket between ticks, and how a flood moves it (pure).

One :class:`BucketMemory` per governed bucket (the fleet's per class, each session's own per
class): the rate of the last flood (the ceiling), the streak of cuts, whether the last flood
came at a rate the ceiling had called safe (the limit fell), a window-type limit's window, and
how far apart probes have spaced out. :func:`cut` decides how deep a flood cuts from that
memory; the AIMD maths itself is :mod:`governor.policy`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from governor.policy import AimdParams, Decision, TickInputs

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
#: A probe above the last ceiling is one step, then this long to see whether it floods (a
#: window fills within about a window, and the flood is judged half a second later). Each step
#: that passes without a flood is twice the one before (up to ``MAX_PROBE_GAIN`` x the first):
#: a limit that rose 50% is found in a few steps, one that did not costs one flood at a single
#: step above the cruise, not the compounding of every tick until the flood is judged.
PROBE_STEP_S = 2.0
MAX_PROBE_GAIN = 4.0
#: An account's own window, once learned, is probed shorter (x this per step) after a quiet
#: period in which it was full: N comes rounded up to whole seconds, so a window learned from
#: a 2-3 s limit can be a second (25-40%) too long, and an account's limit may rise. A probe
#: that floods goes back to the window that held, and the next one splits the difference.
WINDOW_PROBE_STEP = 0.9
#: ...and by at most this many seconds: N's rounding makes a learned W at most about a second
#: too long, so a 30 s window probed by 3 s only buys a flood (with ``WINDOW_PROBE_GAP``,
#: windows over ~17 s, where the rounding costs at most 3%, are not probed at all).
WINDOW_PROBE_MAX_STEP_S = 0.5
#: Window probes stop once the one that flooded is within this fraction of the one that held.
WINDOW_PROBE_GAP = 0.03


@dataclass
class BucketMemory:
    """What the controller remembers of one bucket between ticks (Redis time, seconds)."""

    last_flood_s: float | None = None
    last_cut_s: float | None = None
    ceiling: float | None = None  # the rate measured when the last cut was made
    streak: int = 0  # cuts in a row, each within a quiet period of the one before
    suspect: bool = False  # the last cut's flood came at a rate the ceiling said was safe
    free_at_s: float | None = None  # when the window its last flood found full freed (flood + N)
    window_s: float | None = None  # a window-type limit's window, once one was seen
    window_k: int | None = None  # the requests that got through in it, at that flood
    window_set: tuple[int, float] | None = None  # (K, W s) set as this session's own window
    window_probe_from: tuple[int, float] | None = None  # the window that held before a probe
    window_probe_s: float | None = None  # when the last window probe step was set
    window_too_short: float | None = None  # the longest probed W (with this K) that flooded
    window_answered_s: float | None = None  # the last flood a window probe's revert answered
    window_backoff: float = 1.0  # x the quiet before a window probe: doubled by each flood
    shared: bool = False  # fleet buckets: a shared limit was seen to bind
    probe_backoff: float = 1.0  # × the probe quiet: doubled by each probe that found no headroom
    #: The fleet bucket's last shared cut came while it was not what paced the fleet (not
    #: saturated): the accounts' own buckets were, and alike accounts meeting their own limits
    #: together look like a shared one. The cut stands, but probing starts at once.
    provisional: bool = False
    saturated_s: float | None = None  # when the bucket was last seen saturated
    #: Session buckets: when the latest flood judged this account's own came in (its own limit
    #: spoke then: a pace it kept before that is no evidence of what it may send now).
    own_flood_s: float | None = None
    #: Session buckets: the ceiling was read over the account's first burst from idle, an
    #: upper bound of its limit (:attr:`policy.FloodSeen.limit_from_burst`).
    limit_from_burst: bool = False
    last_probe_s: float | None = None  # when the last probe step above the ceiling was taken
    probe_run: int = 0  # probe steps taken since the last flood (each doubles the next)
    probe_held: float | None = None  # the highest probe step of this probe that held
    #: A flood came while the bucket probed above its cruise: the rate went back to the cruise
    #: at once, and the flood is judged as met at this probe rate.
    probe_from: float | None = None

    def probing(self, current: float, margin: float) -> bool:
        """A raise from ``current`` is a probe above the last ceiling (not a recovery toward
        the cruise below it, nor a slow start that never flooded)."""
        target = self.target(margin)
        return target is not None and current >= target * margin * (1 - 1e-6)

    def probe_to_end(self, current: float, margin: float) -> float | None:
        """The cruise to go back to at once when a flood comes while ``current`` is a probe step
        above it (None: not probing, or a flood already ended this probe)."""
        target = self.target(margin)
        if target is None or self.probe_run == 0 or self.probe_from is not None:
            return None
        cruise = target * margin
        return cruise if current > cruise * (1 + 1e-6) else None

    def probe_gain(self, now_s: float) -> float | None:
        """The × on the policy's probe step: None while the last step is younger than
        ``PROBE_STEP_S`` (hold and watch), else 2 ** the steps taken without a flood since."""
        if self.last_probe_s is not None and now_s - self.last_probe_s < PROBE_STEP_S:
            return None
        return min(MAX_PROBE_GAIN, float(2**self.probe_run))

    def probed(self, now_s: float, current: float) -> None:
        """A probe step from ``current`` is taken now; ``current`` held if it was a step."""
        if self.probe_run > 0:
            self.probe_held = max(self.probe_held or 0.0, current)
        self.last_probe_s = now_s
        self.probe_run += 1

    def probe_judged(self, now_s: float, *, shared: bool, margin: float = 1.0) -> float | None:
        """Every flood of the probe that ended (``probe_from``) is judged. If none was shared
        and no shared flood cut the bucket since the probe ended, they were all accounts' own
        (each at its own limit): above the cruise their own limits bind, not a shared one.
        Wait and space the next probe out as after a probe that found no headroom; otherwise
        the probe went on at its doubled step two seconds later, and one account flooded
        every 2-3 s (`high` seed 3 with a 0.3 s fleet hold: 21 FloodWaits against 10-11).

        Returns the rate the fleet bucket goes to when the probe met only accounts' own limits
        after a step of it had held (a ``margin`` below that step, now the ceiling); else None.
        """
        if self.probe_from is None:
            return None
        cut_since = (
            self.last_cut_s is not None
            and self.last_probe_s is not None
            and self.last_cut_s >= self.last_probe_s
        )
        held, self.probe_held = self.probe_held, None
        self.probe_from = None
        if shared or cut_since:
            return None
        self.probe_run = 0
        self.last_flood_s = now_s
        self.probe_backoff = min(MAX_PROBE_BACKOFF, 2 * self.probe_backoff)
        if held is None or self.ceiling is None or held <= self.ceiling:
            return None
        # A step held without a flood and no shared limit was met above it: the fleet bucket
        # cruises a margin below that step, not back at the cruise before the probe (after a
        # rise of 50%, probes reached 28.7/s, an account's own flood sent the fleet back to
        # 15.5/s each time, and it stayed there: 61% of the new limit).
        self.ceiling, self.streak, self.suspect = held, 1, False
        return held * margin

    def target(self, margin: float) -> float | None:
        """The ceiling the policy recovers toward. Cuts in a row mean the limit fell and the
        rate measured at each flood still overshoots it: each cut of a streak takes twice as
        many recovery margins off as the one before (1, 3, 7, ...; the policy's own cut is the
        floor), so the cascade after a drop ends sooner. One more margin a cut took a 40% drop
        down in 10-12% steps 2.5-3 s apart, a fleet hold and two FloodWaits each: five to seven
        cuts from 23/s to a limit of 14.3/s."""
        if self.ceiling is None:
            return None
        return self.ceiling * margin ** (2 ** max(0, self.streak - 1) - 1)

    def inputs(
        self,
        now_s: float,
        current: float,
        measured: float,
        saturated: bool,
        floods: int,
        margin: float,
    ) -> TickInputs:
        """The policy's view of this bucket: a flooded tick is judged on the flood alone; a
        quiet one also on the ceiling to recover toward and whether it is to be trusted."""
        since_cut = None if self.last_cut_s is None else now_s - self.last_cut_s
        if floods > 0:
            return TickInputs(current, measured, saturated, floods, None, since_cut)
        since_flood = None if self.last_flood_s is None else now_s - self.last_flood_s
        return TickInputs(
            current,
            measured,
            saturated,
            0,
            since_flood,
            since_cut,
            self.target(margin),
            self.suspect,
        )

    def adjust(self, params: AimdParams) -> AimdParams:
        """The configured parameters, with probes spaced as this bucket's history asks."""
        if self.provisional:
            return replace(params, probe_quiet_s=PROBE_STEP_S)
        if self.probe_backoff > 1.0:
            params = replace(params, probe_quiet_s=params.probe_after_s * self.probe_backoff)
        if self.window_s is not None:
            # A window-type limit: probing sooner than two windows after the last flood only
            # buys a flood (the window still holds the requests that made the last one).
            probe_after = max(params.probe_after_s, 2 * self.window_s)
            params = replace(params, probe_quiet_s=probe_after, quiet_period_s=probe_after)
        return params

    def window_probe(self, now_s: float, *, full: bool, quiet_s: float) -> tuple[int, float] | None:
        """The shorter window (K, W) to try now, or None: only a window that is what paces its
        account (``full``), a quiet period (``quiet_s`` x the backoff, at least two windows)
        after its last flood and its last probe step, and while the step is worth taking."""
        if self.window_set is None or self.window_probe_from is not None or not full:
            return None
        k, w = self.window_set
        last = [t for t in (self.last_flood_s, self.window_probe_s) if t is not None]
        if last and now_s - max(last) < max(quiet_s * self.window_backoff, 2 * w):
            return None
        shorter = w - min(w * (1 - WINDOW_PROBE_STEP), WINDOW_PROBE_MAX_STEP_S)
        if self.window_too_short is not None:
            shorter = max(shorter, (w + self.window_too_short) / 2)
        if shorter >= w * (1 - WINDOW_PROBE_GAP):
            return None
        self.window_probe_from = self.window_set
        self.window_probe_s = now_s
        self.window_set = (k, shorter)
        return self.window_set

    def window_probe_held(self, now_s: float) -> None:
        """A probe step that went two of its windows without a flood is the window now."""
        if (
            self.window_probe_from is not None
            and self.window_set is not None
            and self.window_probe_s is not None
            and now_s - self.window_probe_s >= 2 * self.window_set[1]
        ):
            self.window_probe_from = None

    def window_probe_flooded(self, flood_at_s: float) -> tuple[int, float] | None:
        """A flood of the account at ``flood_at_s`` during a window probe: back to the window
        that held (returned), the probed one remembered as too short. None: not probing."""
        if (
            self.window_probe_from is None
            or self.window_set is None
            or self.window_probe_s is None
            or flood_at_s < self.window_probe_s
        ):
            return None
        self.window_too_short = self.window_set[1]
        self.window_set, self.window_probe_from = self.window_probe_from, None
        self.window_answered_s = flood_at_s
        self.window_backoff = min(MAX_PROBE_BACKOFF, 2 * self.window_backoff)
        return self.window_set

    def note_window(self, flood_at_s: float, wait_s: float, span_s: float) -> bool:
        """Remember when the window this flood found full frees, and (a long N) how long the
        window is. False when the window estimate says nothing this time."""
        first = self.free_at_s is None
        self.free_at_s = flood_at_s + wait_s
        if wait_s >= WINDOW_WAIT_S:
            self.window_s = span_s + wait_s
            return True
        # A short N after earlier floods: the window is about as long as the measuring
        # window, and the rate measured at the flood says more than a count diluted by
        # the pause and climb since the last one.
        return first


def cut(
    memory: BucketMemory,
    decision: Decision,
    *,
    now_s: float,
    current: float,
    measured: float,
    estimate: float,
    wait_s: float,
    margin: float,
    quiet_s: float,
    decrease_factor: float,
    probe_answer: bool = False,
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
    previous = memory.ceiling
    near_the_limit = _remember_cut(memory, now_s, current, measured, margin, quiet_s, probe_answer)
    decision = _depth(memory, decision, current, estimate, wait_s, margin, near_the_limit)
    return _one_cut(memory, decision, previous, current, decrease_factor)


def _one_cut(
    memory: BucketMemory,
    decision: Decision,
    previous: float | None,
    current: float,
    decrease_factor: float,
) -> Decision:
    """One flood outside a streak lowers a learned ceiling by one cut at most.

    The rate measured at a flood is the limit only when the bucket was sending all it was
    allowed. An account paused by the fleet's hold sends a request or two, meets a window the
    fleet filled, and is measured at a fraction of its limit: taken at its word, that one flood
    cut an account that had learned 8/s to 0.5/s, and it spent the rest of the run at 44% of
    its limit. A limit that really fell that far floods again within the quiet period, and a
    flood in a streak is taken at its measure.
    """
    if previous is None or memory.streak > 1 or memory.ceiling is None:
        return decision
    floor = previous * decrease_factor
    if memory.ceiling >= floor:
        return decision
    memory.ceiling = floor
    rate = min(current, floor * decrease_factor)
    if rate <= decision.rate:
        return decision
    return Decision(rate, "cut", f"{decision.why}; one cut at most below {previous:.3g}/s")


def _remember_cut(
    memory: BucketMemory,
    now_s: float,
    current: float,
    measured: float,
    margin: float,
    quiet_s: float,
    probe_answer: bool = False,
) -> bool:
    """Update the ceiling, streak, suspicion and probe spacing; True if the flood measured the
    limit itself (a streak, or a probe's answer) rather than a fallen one.

    ``probe_answer``: an account's own flood that came while the fleet bucket probed above
    its cruise. The probe let every account send more, so what the account sent when it was
    refused is a limit met (its own, or its share of the shared one the probe overfilled),
    not a sign that its own limit fell: with a learned ceiling it goes to the cruise a margin
    below that measure. Taken for a fallen limit, each probe of a `low` run cut one account
    by 0.7x and had it climb back step by step (every ~22 s, a different account each time)."""
    since_cut = None if memory.last_cut_s is None else now_s - memory.last_cut_s
    old_target = memory.target(margin)
    # A flood met while probing above the cruise is the probe's answer, not one more cut of
    # a streak: counting it as one took a margin off the ceiling at every probe, and the
    # fleet ratcheted down probe after probe.
    probing = old_target is not None and current > old_target * margin * (1 + 1e-6)
    in_streak = not probing and since_cut is not None and since_cut < quiet_s
    memory.suspect = (
        not in_streak
        and not probe_answer
        and old_target is not None
        and current <= old_target * margin * (1 + 1e-6)
    )
    near_the_limit = in_streak or (old_target is not None and not memory.suspect)
    previous = memory.ceiling
    memory.streak = memory.streak + 1 if in_streak else 1
    memory.last_cut_s = now_s
    memory.probe_run = 0
    memory.probe_held = None
    # What the fleet really sent when Telegram said "too much": the next climb stops a
    # margin below it.
    memory.ceiling = min(current, measured) if measured > 0 else current
    if probing and old_target is not None:
        # A probe's flood: the cruise below the old ceiling held until the probe, so the limit
        # is no lower than that ceiling's margin allowed. An account sending 2/s is measured
        # on four requests in two seconds, one of them refused: the rate read 1.2/s, and the
        # account cruised at 58% of its limit for a minute, until its next probe.
        memory.ceiling = max(memory.ceiling, old_target)
    if previous is not None and not in_streak and not memory.suspect:
        # A probe's flood: if it found the limit where the last one was, probe half as
        # often (each probe costs a flood); if the limit had risen, as often as configured.
        found_more = memory.ceiling > previous * PROBE_HEADROOM
        backoff = min(MAX_PROBE_BACKOFF, 2 * memory.probe_backoff)
        memory.probe_backoff = 1.0 if found_more else backoff
    return near_the_limit


def _depth(
    memory: BucketMemory,
    decision: Decision,
    current: float,
    estimate: float,
    wait_s: float,
    margin: float,
    near_the_limit: bool,
) -> Decision:
    """The cut's rate: what the window allows, the cruise below a limit just measured, or the
    policy's own cut."""
    window = estimate > 0 and (wait_s >= WINDOW_WAIT_S or estimate < BURST_EVIDENCE * decision.rate)
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
    ceiling = memory.target(margin)
    if near_the_limit and ceiling is not None and ceiling * margin > decision.rate:
        return Decision(
            min(current, ceiling * margin),
            "cut",
            f"{decision.why}; straight to the cruise below it",
        )
    return decision
