"""``python -m worker``: the worker's command line.

Subcommands: ``fetch`` (one-shot, for cron or a systemd timer), ``login`` (create a session
interactively), ``demo`` (the README's first command). Settings are built once here and passed
down. Exit codes mean something to supervisord and to scripts; see :class:`Exit`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from fleet.exitcodes import Exit
from fleet.settings import ConfigError, load_settings
from worker.backend import Backend, backend_for
from worker.cmdline import add_command_arguments, build_fetch_payload
from worker.commands import CommandLimits, FetchCommand, parse_command, today_in
from worker.console import ProgressPrinter, print_summary
from worker.errors import CommandRejected, FetchError, PermanentError, SessionRevoked
from worker.settings import WorkerSettings

if TYPE_CHECKING:
    from worker.fetch import FetchOutcome
    from worker.metrics import WorkerMetrics
    from worker.telegram import TelegramSession


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.cmd is None:
        args.cmd = "run"
    try:
        settings = load_settings(WorkerSettings)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return Exit.CONFIG
    _setup_console_logging(settings)
    handler = _HANDLERS.get(args.cmd)
    if handler is None:
        print(f"'{args.cmd}' is not available yet", file=sys.stderr)
        return Exit.USAGE
    try:
        return handler(settings, args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return Exit.CONFIG
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    sub = parser.add_subparsers(dest="cmd")

    fetch = sub.add_parser("fetch", help="fetch a chat once and exit (cron mode)")
    add_command_arguments(fetch, one_shot=True)
    fetch.add_argument("--session", help="session name under SESSIONS_DIR")

    verify = sub.add_parser(
        "verify", help="re-check written days against Telegram (and --repair changed ones)"
    )
    verify.add_argument("--chat", required=True, help="@username, t.me link or numeric id")
    verify.add_argument("--from", dest="from_", metavar="FROM", help="first day (YYYY-MM-DD)")
    verify.add_argument("--to", help="last day (YYYY-MM-DD)")
    verify.add_argument("--repair", action="store_true", help="refetch the days that changed")
    verify.add_argument("--session", help="session name under SESSIONS_DIR")

    login = sub.add_parser("login", help="create a Telegram session interactively")
    login.add_argument("--session", required=True, help="session name under SESSIONS_DIR")

    demo = sub.add_parser("demo", help="a local demo against the built-in Telegram simulator")
    demo.add_argument("--data-dir", default=None, help="where to write (default DATA_DIR)")
    from worker.ops import add_parsers  # run, send, listen, status, dead-letters, check

    add_parsers(sub)
    return parser


# --- fetch -------------------------------------------------------------------------------------


def _cmd_fetch(settings: WorkerSettings, args: argparse.Namespace) -> int:
    from fleet.exporters import start_push_only
    from fleet.metrics import FETCH_JOB, package_version
    from worker.metrics import WorkerMetrics

    # Metrics of a one-shot run: pushed only when a Pushgateway is configured, and its group is
    # kept at exit (delete_group=False) so the last run's values and push time stay visible.
    metrics = WorkerMetrics(
        version=package_version(), chat_label_max=settings.metrics_chat_label_max
    )
    instance = settings.resolved_worker_id(args.session or settings.telegram_session)
    exporters = start_push_only(settings, metrics.registry, job=FETCH_JOB, instance=instance)
    try:
        return asyncio.run(_fetch_once(settings, args, metrics))
    finally:
        if exporters is not None:
            exporters.stop(delete_group=False)


async def _fetch_once(
    settings: WorkerSettings, args: argparse.Namespace, metrics: WorkerMetrics | None = None
) -> int:
    from worker.fetch import Fetcher
    from worker.storage import store_from_settings
    from worker.telegram import TelegramSession

    today = today_in(settings.tz, datetime.now(UTC))
    backend = backend_for(settings)
    session_name = args.session or settings.telegram_session or _default_session(settings, backend)
    telegram = TelegramSession(
        settings, session_name, metrics=metrics, client_factory=backend.client_factory
    )
    started = time.monotonic()
    try:
        await telegram.connect()
        cmd = await _one_shot_command(settings, args, telegram, today)
        if not isinstance(cmd, FetchCommand):
            return cmd  # nothing to fetch, or the request was invalid (already said why)
        store = store_from_settings(settings)
        concurrency = settings.fetch_concurrency
        fetcher = Fetcher(telegram, store, tz=settings.tz, concurrency=concurrency, metrics=metrics)
        bar = ProgressPrinter(cmd)
        outcome: FetchOutcome = await fetcher.run(cmd, on_progress=bar.update)
        bar.done()
    except SessionRevoked as exc:
        _count_failure(metrics, exc.type_name)
        print(f"session {session_name!r} cannot be used: {exc}", file=sys.stderr)
        return Exit.SESSION_REVOKED
    except PermanentError as exc:
        _count_failure(metrics, exc.type_name)
        print(f"{args.chat}: {exc}", file=sys.stderr)
        return Exit.PERMANENT
    except FetchError as exc:
        _count_failure(metrics, exc.type_name)
        print(f"{args.chat}: {exc.type_name}: {exc}", file=sys.stderr)
        return Exit.FAILED
    finally:
        await telegram.close()
    seconds = time.monotonic() - started
    print_summary(cmd, outcome, seconds)
    return _record_outcome(metrics, cmd, outcome, seconds)


async def _one_shot_command(
    settings: WorkerSettings, args: argparse.Namespace, telegram: TelegramSession, today: date
) -> FetchCommand | int:
    """The command the options describe, validated like a queued one, or the exit code when there
    is nothing to fetch or it is invalid. ``--full`` asks Telegram for the chat's first day."""
    payload = build_fetch_payload(args, today)
    max_days = settings.max_range_days
    if _wants_full(settings, args):
        first = await _first_message_day(telegram, args.chat, settings)
        yesterday = today - timedelta(days=1)
        if first is None or first > yesterday:
            print(f"{args.chat}: no history before today")
            return Exit.OK
        payload.update({"mode": "range", "from": first.isoformat(), "to": str(yesterday)})
        max_days = (yesterday - first).days + 1
    limits = CommandLimits(
        today=today,
        max_range_days=max_days,
        max_command_bytes=settings.max_command_bytes,
        default_strategy=settings.fetch_strategy,
    )
    try:
        return parse_command(json.dumps(payload), limits)
    except CommandRejected as exc:
        print(f"invalid request: {exc}", file=sys.stderr)
        return Exit.USAGE


def _record_outcome(
    metrics: WorkerMetrics | None, cmd: FetchCommand, outcome: FetchOutcome, seconds: float
) -> int:
    """The run's exit code, and its duration, status and freshness in the pushed metrics."""
    ok = not outcome.days_failed and not outcome.days_partial
    if metrics is not None:
        metrics.observe_fetch(cmd.chat.display, seconds)
        status = "ok" if ok else ("failed" if outcome.days_failed else "partial")
        metrics.commands_total.labels(status=status).inc()
        if outcome.fresh_until is not None:
            lag = datetime.now(UTC).timestamp() - outcome.fresh_until.timestamp()
            metrics.set_fetch_lag(cmd.chat.display, max(0.0, lag))
    return Exit.OK if ok else Exit.FAILED


def _count_failure(metrics: WorkerMetrics | None, error_type: str) -> None:
    if metrics is not None:
        metrics.fetch_errors_total.labels(type=error_type).inc()
        metrics.commands_total.labels(status="failed").inc()


def _wants_full(settings: WorkerSettings, args: argparse.Namespace) -> bool:
    """``--full``, or no interval on the command line and ``FETCH_MODE=full`` (the seed's way of
    running the whole history from cron or compose); an interval given always wins."""
    if args.full:
        return True
    named = args.date or args.days or args.yesterday or args.from_ or args.to
    return settings.fetch_mode == "full" and not named


async def _first_message_day(
    telegram: object, chat_raw: str, settings: WorkerSettings
) -> date | None:
    from fleet.chats import parse_chat

    resolved = await telegram.resolve(parse_chat(chat_raw))  # type: ignore[attr-defined]
    epoch = datetime(2013, 8, 1, tzinfo=UTC)  # Telegram launched in August 2013
    pages = telegram.iter_history(resolved, epoch, datetime.now(UTC))  # type: ignore[attr-defined]
    async for page in pages:
        if page:
            first: date = page[0].date.astimezone(settings.tz).date()
            await pages.aclose()
            return first
    return None


def _default_session(settings: WorkerSettings, backend: Backend) -> str:
    if backend.session_names:
        return backend.session_names[0]
    found = sorted(settings.sessions_dir.glob("*.session"))
    if len(found) == 1:
        return found[0].stem
    if not found:
        raise ConfigError(
            f"no session in {settings.sessions_dir}; create one with "
            "'python -m worker login --session NAME'"
        )
    names = ", ".join(p.stem for p in found)
    raise ConfigError(f"several sessions ({names}): choose one with --session or TELEGRAM_SESSION")


# --- verify ------------------------------------------------------------------------------------


def _cmd_verify(settings: WorkerSettings, args: argparse.Namespace) -> int:
    return asyncio.run(_verify(settings, args))


async def _verify(settings: WorkerSettings, args: argparse.Namespace) -> int:
    from fleet.chats import parse_chat
    from worker.fetch import Fetcher
    from worker.storage import store_from_settings
    from worker.telegram import TelegramSession
    from worker.verify import Verifier, written_days

    try:
        chat = parse_chat(args.chat)
        first = date.fromisoformat(args.from_) if args.from_ else None
        last = date.fromisoformat(args.to) if args.to else None
    except ValueError as exc:
        print(f"invalid request: {exc}", file=sys.stderr)
        return Exit.USAGE
    store = store_from_settings(settings)
    days = [
        d
        for d in written_days(store, chat.key)
        if (first is None or d >= first) and (last is None or d <= last)
    ]
    if not days:
        print(f"{args.chat}: no written days to verify")
        return Exit.OK
    backend = backend_for(settings)
    session_name = args.session or settings.telegram_session or _default_session(settings, backend)
    telegram = TelegramSession(settings, session_name, client_factory=backend.client_factory)
    verifier = Verifier(telegram, store, tz=settings.tz)
    try:
        await telegram.connect()
        checks = await verifier.check(chat, days)
        if args.repair:
            fetcher = Fetcher(telegram, store, tz=settings.tz)
            today = today_in(settings.tz, datetime.now(UTC))
            await verifier.repair(chat, checks, fetcher, today=today)
    except SessionRevoked as exc:
        print(f"session {session_name!r} cannot be used: {exc}", file=sys.stderr)
        return Exit.SESSION_REVOKED
    except PermanentError as exc:
        print(f"{args.chat}: {exc}", file=sys.stderr)
        return Exit.PERMANENT
    except FetchError as exc:
        print(f"{args.chat}: {exc.type_name}: {exc}", file=sys.stderr)
        return Exit.FAILED
    finally:
        await telegram.close()
    for check in checks:
        print(check.describe())
    changed = [c for c in checks if c.changed]
    left = [c for c in changed if not c.repaired]
    pages = sum(c.pages for c in checks)
    print(
        f"verified {len(checks)} days ({pages} history pages): {len(changed)} changed"
        + (f", {len(changed) - len(left)} repaired" if args.repair else "")
    )
    return Exit.FAILED if left else Exit.OK


# --- login -------------------------------------------------------------------------------------


def _cmd_login(settings: WorkerSettings, args: argparse.Namespace) -> int:
    import getpass

    from worker.login import login

    simulated = backend_for(settings).login_name(args.session)
    if simulated is not None:
        print(f"session {args.session!r} is logged in as {simulated}")
        return Exit.OK
    try:
        name = asyncio.run(
            login(settings, args.session, ask=input, ask_secret=lambda p: getpass.getpass(p))
        )
    except SessionRevoked as exc:
        print(f"login failed: {exc}", file=sys.stderr)
        return Exit.SESSION_REVOKED
    except FetchError as exc:
        print(f"login failed: {exc.type_name}: {exc}", file=sys.stderr)
        return Exit.FAILED
    print(f"session {args.session!r} is logged in as {name}")
    return Exit.OK


# --- demo --------------------------------------------------------------------------------------


def _cmd_demo(settings: WorkerSettings, args: argparse.Namespace) -> int:
    """A local fleet (Redis, a governor, three workers) against the simulator."""
    from worker.demo import run_demo

    data_dir = Path(args.data_dir) if args.data_dir else settings.data_dir
    return run_demo(settings, data_dir)


def _setup_console_logging(settings: WorkerSettings) -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING" if settings.log_level == "INFO" else settings.log_level)


_HANDLERS = {
    "fetch": _cmd_fetch,
    "login": _cmd_login,
    "demo": _cmd_demo,
    "verify": _cmd_verify,
}


def _ops_handlers() -> dict[str, object]:
    from worker.ops import HANDLERS

    return dict(HANDLERS)


_HANDLERS.update(_ops_handlers())  # type: ignore[arg-type]
