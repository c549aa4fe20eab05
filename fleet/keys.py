"""The whole Redis key schema of the fleet, in one place.

Every key but the two names fixed by the contract starts with ``<prefix>{tgf}:``. The common
hash tag ``{tgf}`` puts them all in one Redis Cluster slot, so a Lua script may touch any of
them; ``REDIS_KEY_PREFIX`` (default empty) lets two fleets share one Redis. ``tg_commands`` and
``tg_events`` (CONTRACT §2) take the prefix but no hash tag, so with the default prefix they are
exactly those names. ``<cls>`` is a request class (``history`` | ``resolve`` | ``other``),
``<session>`` a session name (``[A-Za-z0-9_.-]{1,64}``), times are Redis ``TIME`` in µs.

Rate governor (issue 4)
=======================
========================================== ======= =================== ==========================
key                                        type    TTL                 written by / read by
========================================== ======= =================== ==========================
``bucket:fleet:<cls>``                     string  until TAT + 1 s     bucket.lua / bucket.lua
``bucket:session:<session>:<cls>``         string  until TAT + 1 s     bucket.lua / bucket.lua
``window:<session>:<cls>``                 zset    the log's horizon   bucket.lua / bucket.lua
``rates``                                  hash    none                governor / bucket.lua
``rates:configured``                       hash    none                governor / status
``pause:<session>:<cls>``                  string  the pause           flood.lua / bucket.lua
``hold:<cls>``                             string  the hold            flood.lua / bucket.lua
``holds`` (pub/sub channel)                —       —                   flood.lua / workers
``flooded:<cls>``                          hash    shared window + 1 s flood.lua / flood.lua
``floods``                                 stream  capped (MAXLEN ~)   flood.lua / governor
``counters``                               hash    none                bucket.lua, flood.lua /
                                                                       governor (each tick)
``breaker``                                hash    none                breaker.lua, bucket.lua
``breaker:probe``                          string  the probe lease     bucket.lua / breaker.lua
========================================== ======= =================== ==========================

- ``bucket:*`` hold ``"<TAT> <interval>"``: the GCRA *theoretical arrival time* (integer µs)
  of one bucket and the emission interval (µs) it was computed with, so a rate change rescales
  the backlog. A missing key is a full bucket, so the TTL only reclaims memory.
- ``window:<session>:<cls>`` logs the µs each admitted request of that session and class was
  booked for (member ``<µs>:<admit count>``), for the last ``WINDOW_LOG_SECONDS`` (90 s).
- ``rates`` (current rates, what bucket.lua reads) has fields ``fleet:<cls>:rate``,
  ``fleet:<cls>:burst``, ``session:<cls>:rate``, ``session:<cls>:burst`` and per-session
  overrides ``session:<session>:<cls>:rate|burst``, and ``session:<session>:<cls>:window``
  (``"<K> <W µs>"``: that account's own limit learned as a window of K requests per W, which
  replaces its own bucket: a request goes when fewer than K of its log fall in the last W).
  A missing field means "the worker's configured default", so a fleet without a governor runs
  at its settings.
  ``rates:configured`` has the same fields with the configured (starting) values, for status.
- ``pause:<session>:<cls>`` holds the µs until which that session must not send that class
  (a FloodWait of N s: N + jitter); its PX TTL ends with the pause.
- ``hold:<cls>`` holds the µs until which *no* session may send that class: the fleet hold a
  FloodWait sets (min(N, ``FLOOD_FLEET_HOLD_SECONDS``)), so the window Telegram just found full
  drains before anyone else sends into it; its PX TTL ends with the hold.
- ``flooded:<cls>`` maps each session to the µs of its last FloodWait on the class: a flood
  that comes within the shared-flood window of another session's is evidence of a limit the
  sessions share, and only such a flood holds the class fleet-wide.
- ``floods`` has one entry per FloodWait: ``session``, ``class``, ``seconds``, ``worker``.
- ``counters`` (monotonic; the governor diffs them each tick) has fields
  ``<cls>:admits``, ``<cls>:waits`` (admits that had to wait), ``<cls>:fleet_waits`` (the
  fleet bucket was what they waited for: saturation), ``<cls>:wait_us``, ``<cls>:refused``,
  ``<cls>:floods``, ``session:<session>:<cls>:admits``, ``session:<session>:<cls>:floods``,
  ``rate_limit_hits``.
- ``breaker`` fields: ``state`` (``closed`` | ``open`` | ``half_open``), ``until_us`` (end of
  the open period), ``failures`` (comma-separated µs of the last transient failures, at most
  ``CIRCUIT_BREAKER_FAILURE_THRESHOLD``), ``changed_us``, ``opened`` (count).
- ``breaker:probe`` holds the token of the one request allowed through half-open.

Reserved for the queue, worker and governor daemons (names fixed here, used by later work)
=========================================================================================
========================================== ======= =================== ==========================
``tg_commands`` (prefix, no hash tag)      list    none                producers / workers
``tg_events`` (prefix, no hash tag)        PubSub  —                   workers / subscribers
``processing:<worker_id>``                 list    none (recovered)    worker / governor
``worker:<worker_id>``                     string  heartbeat lease     worker / governor
``workers``                                hash    none                worker / governor, status
``session-lease:<session>``                string  lease               worker / worker
``completed``                              zset    trimmed by age      worker / worker
``dead``                                   list    capped              worker / operators
``events``                                 stream  capped (MAXLEN ~)   worker / late subscribers
``governor:leader``                        string  leader lease        governor / governor
``schedule:<chat>:<date>``                 string  3 days              scheduler.py (SET NX)
``deliveries``                             hash    none (HDEL on end)  recover.lua / recover.lua
``retries``                                hash    none (HDEL on end)  worker / worker
``delayed``                                zset    none (drained)      worker / recovery
``sessions-bad``                           hash    none                worker / worker, status
``running``                                hash    none (HDEL on end)  worker / worker
========================================== ======= =================== ==========================

Incremental scheduler (issue 14)
================================
========================================== ======= =================== ==========================
``channels``                               hash    none                governor cli / scheduler
``hwm``                                    hash    none                ack.lua / scheduler, status
``sched:inflight``                         hash    none (HDEL on end)  schedule_tick.lua
``sched:state``                            hash    none                schedule_tick.lua / status
``split:<command_id>``                     hash    none (DEL on end)   split.lua / part_done.lua
``split:<command_id>:pending``             set     none (DEL on end)   split.lua / part_done.lua
``split:<command_id>:files``               set     none (DEL on end)   part_done.lua
``split:<command_id>:failed``              hash    none (DEL on end)   part_done.lua
========================================== ======= =================== ==========================

- ``channels``: chat key → JSON ``{chat, backfill, interval, priority, paused, added_at}``
  (:mod:`governor.channels`).
- ``hwm``: chat key → JSON ``{id, day, at, command_id}``, the chat's high-water mark: every
  message with ``id <= id`` dated on or after ``day`` is in the day files, and every day
  before ``day`` that the chat's commands covered is complete. Written only by ``ack.lua``
  when a command carrying ``after_id`` completes, in the step that acknowledges it (after the
  day files and ``progress.json``), and never lowered.
- ``sched:inflight``: chat key → the raw command the scheduler pushed and that is still queued,
  delayed, held or running somewhere; the scheduler pushes no second command for that chat
  while it is there.
- ``sched:state``: chat key → JSON ``{seq, command_id, mode, enqueued_ms, finished_ms,
  result, failures}``; ``seq`` is compared-and-set by ``schedule_tick.lua``, so two governors
  that both believe they lead cannot push the same run twice.
- ``split:<command_id>`` (a ``per_day`` command split into per-day parts, :mod:`worker.parts`):
  fields ``parent`` (its raw JSON), ``chat``, ``mode``, ``params`` (JSON), ``total``,
  ``started_ms``, ``processed``, ``errors``, ``partial``, ``max_id``; ``:pending`` holds the
  days not finished yet, ``:files`` the day files written, ``:failed`` day → error of the
  parts that failed for good. All four go when the last part closes the parent.
"""

from __future__ import annotations

import re

from fleet.gate import REQUEST_CLASSES

HASH_TAG = "{tgf}"
COMMANDS_QUEUE = "tg_commands"
EVENTS_CHANNEL = "tg_events"

_SESSION = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_PREFIX = re.compile(r"[^{}\s]*")


def check_session(name: str) -> str:
    """A session name that is safe inside a key and a hash field, or ``ValueError``."""
    if not _SESSION.fullmatch(name):
        raise ValueError(f"session names are 1-64 characters of [A-Za-z0-9_.-], got {name!r}")
    return name


def check_class(request_class: str) -> str:
    if request_class not in REQUEST_CLASSES:
        raise ValueError(f"unknown request class {request_class!r}; known: {REQUEST_CLASSES}")
    return request_class


class Keys:
    """Every key name of one fleet, built from ``REDIS_KEY_PREFIX``."""

    def __init__(self, prefix: str = "") -> None:
        if not _PREFIX.fullmatch(prefix):
            raise ValueError("REDIS_KEY_PREFIX must not contain braces or spaces")
        self.prefix = prefix
        self.base = f"{prefix}{HASH_TAG}:"

    def _k(self, *parts: str) -> str:
        return self.base + ":".join(parts)

    # --- contract names (no hash tag) ------------------------------------------------------
    @property
    def commands(self) -> str:
        return self.prefix + COMMANDS_QUEUE

    @property
    def events_channel(self) -> str:
        return self.prefix + EVENTS_CHANNEL

    # --- rate governor -----------------------------------------------------------------------
    def fleet_bucket(self, request_class: str) -> str:
        return self._k("bucket", "fleet", check_class(request_class))

    def session_bucket(self, session: str, request_class: str) -> str:
        return self._k("bucket", "session", check_session(session), check_class(request_class))

    def window_log(self, session: str, request_class: str) -> str:
        return self._k("window", check_session(session), check_class(request_class))

    @property
    def bucket_pattern(self) -> str:
        """``SCAN MATCH`` pattern of every bucket key (status only)."""
        return self._k("bucket", "*")

    @property
    def rates(self) -> str:
        return self._k("rates")

    @property
    def rates_configured(self) -> str:
        return self._k("rates", "configured")

    def pause(self, session: str, request_class: str) -> str:
        return self._k("pause", check_session(session), check_class(request_class))

    @property
    def pause_pattern(self) -> str:
        return self._k("pause", "*")

    def fleet_hold(self, request_class: str) -> str:
        return self._k("hold", check_class(request_class))

    def flooded(self, request_class: str) -> str:
        """Hash: session → µs of its last FloodWait on the class (shared-flood evidence)."""
        return self._k("flooded", check_class(request_class))

    @property
    def holds_channel(self) -> str:
        """Pub/sub channel: flood.lua announces each new fleet hold (``<cls> <ms>``)."""
        return self._k("holds")

    @property
    def floods(self) -> str:
        return self._k("floods")

    @property
    def counters(self) -> str:
        return self._k("counters")

    @property
    def breaker(self) -> str:
        return self._k("breaker")

    @property
    def breaker_probe(self) -> str:
        return self._k("breaker", "probe")

    # --- reserved for the queue, worker and governor daemons ---------------------------------
    def processing(self, worker_id: str) -> str:
        return self._k("processing", worker_id)

    def worker_lease(self, worker_id: str) -> str:
        return self._k("worker", worker_id)

    @property
    def workers(self) -> str:
        return self._k("workers")

    def session_lease(self, session: str) -> str:
        return self._k("session-lease", check_session(session))

    @property
    def completed(self) -> str:
        return self._k("completed")

    @property
    def dead_letters(self) -> str:
        return self._k("dead")

    @property
    def events_stream(self) -> str:
        return self._k("events")

    @property
    def governor_leader(self) -> str:
        return self._k("governor", "leader")

    def schedule_marker(self, chat_day: str) -> str:
        """String ``schedule:<chat key>:<YYYY-MM-DD>``: that day's command for that chat was
        pushed (``fleet/lua/schedule.lua``, ``SET NX`` with a TTL)."""
        return self._k("schedule", chat_day)

    @property
    def deliveries(self) -> str:
        """Hash ``command_id`` → times recovered from a dead worker (``fleet/lua/recover.lua``)."""
        return self._k("deliveries")

    @property
    def retries(self) -> str:
        """Hash ``command_id`` → retryable failures so far (the command's retry budget)."""
        return self._k("retries")

    @property
    def delayed(self) -> str:
        """Zset of raw commands waiting for a retry, scored by due time (Redis ``TIME``, ms)."""
        return self._k("delayed")

    @property
    def running(self) -> str:
        """Hash ``command_id`` → worker executing it (a duplicate waits while that one lives)."""
        return self._k("running")

    @property
    def sessions_bad(self) -> str:
        """Hash session name → JSON ``{reason, ts, worker_id, file_mtime}`` (revoked sessions)."""
        return self._k("sessions-bad")

    # --- incremental scheduler (issue 14) -------------------------------------------------
    @property
    def channels(self) -> str:
        """Hash chat key → JSON channel record (:mod:`governor.channels`)."""
        return self._k("channels")

    @property
    def hwm(self) -> str:
        """Hash chat key → JSON high-water mark ``{id, day, at, command_id}`` (ack.lua)."""
        return self._k("hwm")

    @property
    def sched_inflight(self) -> str:
        """Hash chat key → raw command the scheduler pushed, while it is not over."""
        return self._k("sched", "inflight")

    @property
    def sched_state(self) -> str:
        """Hash chat key → JSON run state of the chat (schedule_tick.lua)."""
        return self._k("sched", "state")

    @property
    def processing_prefix(self) -> str:
        """``processing:<worker_id>`` without the worker id (Lua builds the names)."""
        return self._k("processing", "")

    def split(self, command_id: str) -> str:
        """Hash: the parent of a command split into per-day parts (see the docstring)."""
        return self._k("split", command_id)

    @property
    def split_prefix(self) -> str:
        """``split:<command_id>`` without the id (Lua builds the names)."""
        return self._k("split", "")
