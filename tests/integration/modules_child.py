"""Runs ``python -m worker`` (its ``worker.cli.main``) and, at exit, writes the names of every
module the process loaded to the file named by ``MODULES_DUMP`` (one JSON list)."""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path


def _dump() -> None:
    Path(os.environ["MODULES_DUMP"]).write_text(json.dumps(sorted(sys.modules)))


atexit.register(_dump)

from worker.cli import main  # noqa: E402  (after the hook: an import failure is dumped too)

sys.exit(main(sys.argv[1:]))
