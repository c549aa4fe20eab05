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
- Always within ``[min_rate, max_rate]``.
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
                step = params.increase_step
                why = f"climbing step by step toward {target:.3g}/s (the limit fell)"
            else:
                step = max(params.increase_step, (target - current) * params.recovery_speed)
                why = f"recovering toward {target:.3g}/s (below the last flood)"
            return Decision(min(target, current + step), "raise", why)
    since_flood = inputs.seconds_since_flood
    if since_flood is not None and since_flood < params.quiet_period_s:
        return Decision(current, "hold", "saturated, but within the quiet period after a flood")
    if inputs.ceiling is not None and (
        since_flood is not None and since_flood < PROBE_QUIET_FACTOR * params.quiet_period_s
    ):
        # Cruise just below the rate that flooded (with the bucket's burst on top, closing in
        # on it floods again); probe above it only now and then.
        return Decision(current, "hold", "cruising below the last flood; probing later")
    new = params.clamp(current + params.increase_step)
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
    )
