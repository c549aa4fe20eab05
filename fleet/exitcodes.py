"""The exit codes of every fleet program, in one place (supervisord and Compose act on them).

``exitcodes=0,77,78`` in ``supervisor.conf`` means a revoked session or a bad setting is not
restarted in a loop; 69 (Redis gone) and 1 are restarted.
"""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    FAILED = 1  # some day did not complete, or the worker lease was lost; worth retrying
    USAGE = 2
    PERMANENT = 65  # the command can never succeed (bad chat, private chat)
    REDIS_UNAVAILABLE = 69  # Redis unreachable beyond REDIS_MAX_OUTAGE_SECONDS; restart
    SESSION_REVOKED = 77  # the session must be recreated by a person; do not restart
    CONFIG = 78  # a setting is wrong; do not restart
