"""The promotion lock: one champion change at a time.

Promotion is compare-and-set: read the champion, compare it with the version the challenger was
evaluated against, move the alias. MLflow has no atomic "set alias if it still points to X", so
the read-compare-write must run under a lock.

What this module gives:
    `promotion_lock` takes an exclusive `fcntl.flock` on `<lock_dir>/<name>.lock`. `flock` locks
    belong to an open file description, so the lock excludes other threads of this process *and*
    other processes on the same host (every Prefect task runner, CLI invocation or test worker
    that uses the same lock directory). The embedded default (SQLite store under one home
    directory) lives on one host, so this is the complete guarantee there. The lock is released
    by the kernel when the holder dies: a crashed promoter never leaves a stale lock.

What holds across hosts (a shared `mlflow server`, several workers):
    - The Prefect global concurrency limit taken by the tasks layer around promote/rollback
      serialises promoters cluster-wide (this package does not import Prefect).
    - Inside the lock, `Registry.promote` re-reads the champion just before moving the alias and
      re-reads it again afterwards; a promoter that lost a race sees the other's champion and
      reports a stale comparison instead of overwriting it.

What does not hold:
    - Without the Prefect limit, two hosts can both pass the re-check in the few milliseconds
      between read and write; the later write wins and the post-write re-read only detects the
      overwrite if it happens after it. `flock` on a network file system (NFS) is not reliable
      either; do not rely on a shared lock directory across hosts.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

_POLL_SECONDS = 0.05


class LockTimeoutError(TimeoutError):
    """The promotion lock stayed held by someone else for longer than the timeout."""


def default_lock_dir() -> Path:
    """Per-user lock directory used when none is configured (covers one host)."""
    return Path(tempfile.gettempdir()) / f"evergreen-locks-{os.getuid()}"


def lock_path(name: str, lock_dir: Path | None) -> Path:
    """The lock file for `name`: characters outside [A-Za-z0-9._-] become '_'."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"
    return Path(lock_dir or default_lock_dir()) / f"{safe}.lock"


@contextlib.contextmanager
def promotion_lock(
    name: str, lock_dir: Path | None, timeout: float = 60, activity: str = "promotion or rollback"
) -> Iterator[Path]:
    """Hold an exclusive lock named `name` for the duration of the `with` block.

    Args:
        name: What is being protected, e.g. the registered model name.
        lock_dir: Directory for lock files (created if missing); None = a per-user temp folder.
        timeout: Seconds to wait for the lock before giving up.
        activity: what the lock guards, for the timeout message.

    Yields:
        The path of the lock file.

    Raises:
        LockTimeoutError: the lock was not acquired within `timeout` seconds (the message names
            the lock file and the process id recorded by the holder).
    """
    path = lock_path(name, lock_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, path, timeout, activity)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield path
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, path: Path, timeout: float, activity: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = path.read_text().strip() or "unknown"
                raise LockTimeoutError(
                    f"{activity} lock {path} is still held (by pid {holder}) after {timeout:g} s:"
                    f" another {activity} is running; retry when it has finished"
                    " (the lock is released automatically when its holder exits)"
                ) from None
            time.sleep(_POLL_SECONDS)
