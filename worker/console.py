"""What a one-shot ``python -m worker fetch`` prints on the console: a progress line while it
runs (a bar on a terminal, plain lines otherwise) and a summary with the files it wrote."""

from __future__ import annotations

import sys

from worker.commands import FetchCommand


class ProgressPrinter:
    """A one-line progress bar on a terminal; plain lines otherwise."""

    def __init__(self, cmd: FetchCommand) -> None:
        self.cmd = cmd
        self.tty = sys.stderr.isatty()
        self.total = len(cmd.days)

    async def update(self, outcome: object) -> None:
        from worker.fetch import FetchOutcome

        assert isinstance(outcome, FetchOutcome)
        done = len(outcome.days_completed) + len(outcome.days_skipped) + len(outcome.days_partial)
        width = 30
        filled = int(width * done / self.total) if self.total else width
        line = (
            f"{self.cmd.chat.display} [{'#' * filled}{'.' * (width - filled)}] "
            f"{done}/{self.total} days, {outcome.processed} messages"
        )
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def print_summary(cmd: FetchCommand, outcome: object, seconds: float) -> None:
    from worker.fetch import FetchOutcome

    assert isinstance(outcome, FetchOutcome)
    print(
        f"{cmd.chat.display}: {outcome.processed} messages in {seconds:.1f}s; "
        f"days complete {len(outcome.days_completed)}, already complete "
        f"{len(outcome.days_skipped)}, partial {len(outcome.days_partial)}, "
        f"failed {len(outcome.days_failed)}"
    )
    for day, err in sorted(outcome.days_failed.items()):
        print(f"  failed {day}: {err.type_name}: {err}")
    for path in outcome.files:
        print(f"  {path}")
