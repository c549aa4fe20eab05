"""What every writer under ``DATA_DIR`` shares: bounded ``flock``s, durable renames, and which
``OSError``s are the environment's fault.

Both the day files (:mod:`worker.storage`) and the progress records (:mod:`worker.progress`)
lock, rename and classify errors the same way; one module keeps them from drifting apart.

Storage errors are classified: errors of the environment (disk full, read-only or failing file
system, permissions, a lock held too long) are *retryable* (``StorageError.retryable``): the
command is retried later and, when its retries are used up, dead-lettered for a requeue.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from worker.errors import StorageError

# errno values that say "the environment, not the data": worth retrying later.
RETRYABLE_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EIO,
        errno.EACCES,
        errno.EPERM,
        errno.EAGAIN,
        errno.EBUSY,
        errno.ESTALE,
        errno.ENOMEM,
    }
)


def storage_error(
    message: str, exc: OSError | None = None, *, retryable: bool | None = None
) -> StorageError:
    """A :class:`StorageError`, retryable when ``exc`` is an error of the environment."""
    err = StorageError(message)
    if retryable is None:
        retryable = exc is not None and exc.errno in RETRYABLE_ERRNOS
    err.retryable = retryable
    return err


def os_error(action: str, path: Path, exc: OSError) -> StorageError:
    """Retryable when the environment failed (disk full, read-only, I/O error...)."""
    return storage_error(f"cannot {action} {path}: {exc.strerror or exc}", exc)


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing), waiting up to ``timeout_s``.

    ``flock`` locks belong to the open file description, so two threads or two writers of one
    process exclude each other too. The lock files stay on disk: deleting them would race.
    """
    fd = acquire_fd_lock(path, timeout_s, what)
    try:
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def acquire_fd_lock(path: Path, timeout_s: float, what: str) -> int:
    """Open ``path`` and lock it exclusively; the caller unlocks by closing the returned fd."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise storage_error(f"cannot open lock file {path}: {exc.strerror or exc}", exc) from exc
    try:
        _acquire(fd, path, timeout_s, what)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _acquire(fd: int, path: Path, timeout_s: float, what: str) -> None:
    # Polling instead of a blocking flock keeps the wait bounded without signals or threads.
    deadline = time.monotonic() + timeout_s
    pause = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise storage_error(
                    f"{what} is locked by another writer ({path}); gave up after {timeout_s:g}s",
                    retryable=True,
                ) from None
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        except OSError as exc:
            raise storage_error(f"cannot lock {path}: {exc.strerror or exc}", exc) from exc


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
