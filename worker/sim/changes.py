"""Changes behind the fetcher's back: a generated day with messages deleted, added or edited.

Pure: :func:`change` derives the changed day from the day as it is now; the world records it
(and when each edit happened) so the change is never forgotten.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

from worker.sim.history import STRIDE, _Day, _u64


@dataclass(frozen=True, slots=True)
class Change:
    """The changed day, and the ids it touched, by kind."""

    day: _Day
    deleted: list[int]
    added: list[int]
    edited: list[int]


def change(
    built: _Day, *, seed: int, chat_id: int, day: int, delete: int, add: int, edit: int
) -> Change:
    """Delete ``delete`` messages (from the middle), add ``add`` in the day's id gaps (dated
    like their predecessor, so ids still grow with time), pick ``edit`` to edit."""
    origin = built.origin or built
    ids, ts, bits = list(built.ids), list(built.ts), list(built.bits)
    pos = list(built.pos) if built.pos is not None else list(range(len(ids)))
    deleted: list[int] = []
    for _ in range(min(delete, len(ids))):
        k = len(ids) // 2
        deleted.append(ids[k])
        del ids[k], ts[k], bits[k], pos[k]
    added: list[int] = []
    taken = set(ids) | set(deleted)
    gaps = [i for i in range(ids[0] + 1, ids[-1]) if i not in taken] if ids else []
    if ids:  # then after the day's last id, inside its id slot
        gaps += range(ids[-1] + 1, min(ids[-1] + 1 + add, (day + 1) * STRIDE + 1))
    for msg_id in gaps[:add]:
        k = bisect_left(ids, msg_id)
        ids.insert(k, msg_id)
        ts.insert(k, ts[k - 1])
        bits.insert(k, _u64("added", seed, chat_id, msg_id))
        pos.insert(k, -1)
        added.append(msg_id)
    # Service messages have no text to edit: pick among the others, spread over the day.
    texts = [k for k in range(len(ids)) if (bits[k] >> 8) & 0xFF >= 4]
    step = max(1, len(texts) // max(1, edit))
    edited = [ids[k] for k in texts[::step]][:edit]
    return Change(_Day(ids, ts, bits, origin, pos), deleted, added, edited)
