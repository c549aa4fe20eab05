"""Bad input (issue 3 acceptance): 200 generated invalid payloads → 200 ``failed`` events (not
retryable), 200 dead letters, no file outside DATA_DIR, and the worker still serves a valid
command afterwards."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.integration.daemon_harness import Fleet, RedisView, base_env, fetch, wait_for

pytestmark = pytest.mark.slow
TEN_MB = 10 * 1024 * 1024


def _payloads(rng: random.Random) -> list[bytes]:
    out: list[bytes] = []
    ok = {"command": "fetch", "chat": "@ru_python", "mode": "date", "date": "2025-03-01"}

    def j(**changes: object) -> bytes:
        return json.dumps({**ok, **changes}).encode()

    # 40 not JSON at all
    for i in range(40):
        kind = i % 4
        if kind == 0:
            out.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
        elif kind == 1:
            out.append(j()[: rng.randrange(1, 40)])  # truncated JSON
        elif kind == 2:
            out.append(b"\xff\xfe{" + str(i).encode())  # invalid UTF-8
        else:
            out.append(f"fetch @ru_python {i}".encode())
    # 40 wrong types / wrong values
    wrong: list[dict[str, object]] = [
        {"chat": 12.5},
        {"chat": None},
        {"chat": ["@a"]},
        {"mode": ["date"]},
        {"mode": "week"},
        {"date": 20250301},
        {"date": "2025-02-30"},
        {"date": "yesterday"},
        {"command": "delete"},
        {"command": None},
        {"mode": "days", "days": "3"},
        {"mode": "days", "days": -1},
        {"mode": "days", "days": True},
        {"limit": -5},
        {"limit": "all"},
        {"options": "force"},
        {"options": {"force": "yes"}},
        {"strategy": "fast"},
        {"command_id": "../../x"},
        {"command_id": 42},
        {"requested_by": {"a": 1}},
        {"timestamp": 123},
        {"mode": "range", "from": "2025-03-05", "to": "2025-03-01"},
        {"mode": "range", "from": "2020-01-01", "to": "2025-03-01"},
        {"date": "2999-01-01"},
        {"mode": "days", "days": 10**9},
    ]
    for i in range(40):
        out.append(j(**{"requested_by": f"bad-{i}", **wrong[i % len(wrong)]}))
    # 40 path traversal and other hostile chats
    chats = [
        "../../etc/passwd",
        "@../../../tmp/evil",
        "..\\..\\windows",
        "/etc/shadow",
        "ru_python/../../x",
        "t.me/../../evil",
        "https://t.me/+invite",
        "%2e%2e%2fevil",
        "@ru\x00python",
        "chat\nname",
        "",
        " ",
        "@" + "a" * 300,
        "-0",
        "0",
        "99999999999999999999999",
        "@a",
        "@1abc",
        "CON",
        "@ru python",
    ]
    for i in range(40):
        out.append(j(chat=chats[i % len(chats)], command_id=f"trav-{i}"))
    # 20 too big: 5 of 10 MB, 15 just over MAX_COMMAND_BYTES
    for i in range(20):
        size = TEN_MB if i < 5 else 65536 + rng.randrange(1, 5000)
        out.append(j(requested_by="x" * size))
    # 40 nested junk
    for i in range(40):
        kind = i % 4
        if kind == 0:
            out.append(b"[" * 5000 + b"]" * 5000)
        elif kind == 1:
            deep: object = "x"
            for _ in range(20):
                deep = {"a": deep}
            out.append(j(options=deep))
        elif kind == 2:
            out.append(json.dumps([ok] * 3).encode())  # an array, not an object
        else:
            out.append(rng.choice([b"null", b"42", b'"fetch"', b"true", b"{}"]))
    # 20 more: a command hidden in a list, duplicated keys, NaN, huge numbers
    for i in range(20):
        out.append(
            rng.choice(
                [
                    b'{"command":"fetch","chat":"@ru_python","mode":"date","date":NaN}',
                    b'{"command":"fetch","chat":"@ru_python","mode":"days","days":1e400}',
                    b'{"command":"fetch","chat":"@ru_python","mode":"date","date":"2025-03-01",'
                    b'"chat":"../up"}',
                    json.dumps({"cmd": ok}).encode(),
                ]
            )
            + b" " * i
        )
    assert len(out) == 200
    return out


def test_200_invalid_payloads_are_rejected_and_the_worker_goes_on(
    redis_url: str, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    data = work / "data"
    fleet = Fleet(base_env(redis_url, data, work), work)
    rv = RedisView(redis_url)
    before = {p for p in tmp_path.rglob("*")}
    try:
        [w] = fleet.start(1)
        payloads = _payloads(random.Random(3))
        rv.push(*payloads)
        wait_for(lambda: len(rv.by_kind("failed")) >= 200, 90, "200 failed events", every=0.2)
        rv.push(fetch("@ru_python", "2025-03-01", command_id="valid-after"))
        done = wait_for(
            lambda: next(
                (e for e in rv.by_kind("completed") if e["command_id"] == "valid-after"), None
            ),
            20,
        )
        failed = rv.by_kind("failed")
        assert len(failed) == 200
        assert all(e["retryable"] is False for e in failed)
        assert all(e["error"]["type"] == "CommandRejected" for e in failed)
        assert all(e["error"]["message"] for e in failed)
        letters = rv.dead_letters()
        assert len(letters) == 200
        assert {lt["source"] for lt in letters} == {"validation"}
        big = [lt for lt in letters if lt["payload_bytes"] >= TEN_MB]
        assert len(big) == 5 and all(lt["truncated"] for lt in big)
        assert w.proc.poll() is None
        assert not rv.queue()
        assert done["files"] == ["data/ru_python/2025/discussions_2025-03-01.json"]
        print(f"bad input: {len(failed)} failed events, {len(letters)} dead letters")
    finally:
        fleet.stop_all()
        rv.close()
    created = {p for p in tmp_path.rglob("*")} - before
    outside = [
        p
        for p in created
        if p.is_file() and data not in p.parents and p.parent != work  # logs, health of w0
    ]
    assert outside == []
    assert {p.name for p in data.iterdir()} <= {"ru_python", "progress.json", ".progress.lock"}
