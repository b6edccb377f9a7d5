"""Challenger staging folders under `<home>/staging`, and the sweep of those a killed run left.

A run removes its staging folder when it ends (`tasks.promote.challenger_workspace`), but a run
that is SIGKILLed (OOM killer, a cancelled worker, a reboot) never reaches its `finally`, and
each folder holds a whole checkpoint. So a folder has an owner the kernel keeps track of: its
run holds an exclusive `flock` on `<folder>/.owner` while it works, and the kernel drops the
lock the moment that process dies. Every flow start sweeps the folders that are older than
`STALE_AFTER_SECONDS` and whose lock it can take (no live owner). The age floor keeps a folder
that is being created (before its lock is taken) and covers file systems where `flock` does not
reach other hosts (NFS): a live run on another host keeps its folder for an hour at least.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

OWNER_FILE = ".owner"
STALE_AFTER_SECONDS = 3600.0

log = logging.getLogger("evergreen.staging")


@contextmanager
def owned(folder: Path) -> Iterator[Path]:
    """Hold `folder`'s owner lock (and record this process id in it) for the block."""
    fd = os.open(folder / OWNER_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh folder: nobody else holds it
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield folder
    finally:
        os.close(fd)  # releases the lock


def _has_live_owner(folder: Path) -> bool:
    """Whether a live process holds `folder`'s owner lock (no owner file: no owner)."""
    try:
        fd = os.open(folder / OWNER_FILE, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def sweep_stale(staging: Path, *, older_than: float = STALE_AFTER_SECONDS) -> list[str]:
    """Remove the staging folders killed runs left: older than `older_than` seconds, no live
    owner. Symlinks and files are left alone (evergreen creates neither here).

    Returns:
        The names of the folders removed.
    """
    if not staging.is_dir():
        return []
    removed = []
    now = time.time()
    for folder in sorted(staging.iterdir()):
        try:
            if folder.is_symlink() or not folder.is_dir():
                continue
            if now - folder.stat().st_mtime < older_than or _has_live_owner(folder):
                continue
            shutil.rmtree(folder)
        except FileNotFoundError:  # a concurrent sweep got there first
            continue
        except OSError as error:  # e.g. not ours to remove
            log.warning("staging folder %s not swept: %s", folder.name, error)
            continue
        removed.append(folder.name)
    return removed
