"""Attempt markers: an update's batches are on disk before its work begins, so an attempt that
ended without a ledger entry is recorded as `failed` by the next run.

Two ways a run ends without its entry: it is killed (SIGKILL, OOM, a pre-empted node) and never
reaches its `except`, or it fails while the disk is full and the ledger cannot take the `failed`
entry either. Either way the batch used to stay pending with no entry at all: nobody could see
that an attempt had been made, or why it failed.

So `challenger_workspace` calls `begin` first: a small JSON file `<home>/attempts/<cadence>-…json`
(cadence, batches, flow run, pid, host, start time), held under an exclusive `flock` for as long
as the process lives. The ledger's writer (`tasks.ledger.record`) removes it once it recorded
the run's outcome. When even `failed` cannot be written, `unrecorded` renames the marker so its
name carries the error (a rename writes no file data, so it works where a write does not). Every
flow start (`flows.common.begin`) calls `reconcile`: a marker whose lock nobody holds (its run is
dead; a run on another host: older than `STALE_AFTER_SECONDS`) gets a `failed` entry for each of
its batches that has no entry since the attempt started, with the reason found — the error
from the marker's name, else "interrupted" — and is removed.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from evergreen.config import EvergreenConfig
from model_registry.ledger import Ledger
from model_registry.run_log import now_iso
from tasks.staging import STALE_AFTER_SECONDS

ATTEMPTS_DIR = "attempts"
FAILED_MARK = ".failed."  # <marker>.json.failed.<quoted error>: the run's error, by rename
_REASON_CHARS = 150
log = logging.getLogger("evergreen.attempts")


@dataclass
class _Open:
    path: Path
    fd: int


_open: dict[tuple[str, str], _Open] = {}
_lock = threading.Lock()


def _folder(cfg: EvergreenConfig) -> Path:
    return cfg.home_path / ATTEMPTS_DIR


def _flow_run_id() -> str:
    """`tasks.common.current_flow_run_id`, imported when needed: `tasks.common` loads torch
    (≈ 2.8 s), and the CLI's no-op check (`evergreen.pending` → `tasks.ledger`) imports this
    module without ever starting a run."""
    from tasks.common import current_flow_run_id

    return current_flow_run_id()


def begin(cfg: EvergreenConfig, cadence: str, batch_ids: list[str]) -> None:
    """Write and lock this run's marker before its work begins (a warning if it cannot be
    written: the run goes on as before markers existed)."""
    if not batch_ids:
        return
    folder = _folder(cfg)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    path = folder / f"{cadence}-{stamp}-{uuid.uuid4().hex[:8]}.json"
    facts = {
        "cadence": cadence,
        "batch_ids": list(batch_ids),
        "flow_run_id": _flow_run_id(),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started_at": now_iso(),
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = _write_locked(path, json.dumps(facts).encode())
    except OSError as error:
        log.warning("attempt marker not written (%s): a crash now leaves no ledger entry", error)
        return
    with _lock:
        previous = _open.pop((str(cfg.home_path), cadence), None)
        _open[(str(cfg.home_path), cadence)] = _Open(path, fd)
    if previous is not None:  # an earlier run in this process never recorded: reconcile it
        os.close(previous.fd)


def _write_locked(path: Path, data: bytes) -> int:
    """Write `path` whole (temporary name, fsync, rename) and return a descriptor holding its
    exclusive lock."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, data)
            os.fsync(fd)
            os.replace(tmp, path)
        except BaseException:
            os.close(fd)
            raise
    finally:
        tmp.unlink(missing_ok=True)
    return fd


def finish(cfg: EvergreenConfig, cadence: str) -> None:
    """The run recorded its outcome: remove its marker."""
    with _lock:
        attempt = _open.pop((str(cfg.home_path), cadence), None)
    if attempt is not None:
        attempt.path.unlink(missing_ok=True)
        os.close(attempt.fd)


def unrecorded(cfg: EvergreenConfig, cadence: str, error: BaseException) -> None:
    """The run failed and its `failed` entry could not be written: put the error into the
    marker's name for the next run to record (best effort)."""
    with _lock:
        attempt = _open.get((str(cfg.home_path), cadence))
    if attempt is None:
        return
    reason = quote(f"{type(error).__name__}: {error}", safe=" ._-,:()=")[:_REASON_CHARS]
    reason = reason[: reason.rfind("%")] if "%" in reason[-2:] else reason  # no cut escape
    target = attempt.path.with_name(f"{attempt.path.name}{FAILED_MARK}{reason}")
    try:
        os.rename(attempt.path, target)
        attempt.path = target
    except OSError as rename_error:
        log.warning("attempt marker not updated with the error: %s", rename_error)


def reconcile(cfg: EvergreenConfig) -> list[str]:
    """Record `failed` for the batches of attempts that ended without an entry (see the module
    docstring); returns one line per attempt recorded."""
    folder = _folder(cfg)
    if not folder.is_dir():
        return []
    ledger = Ledger.from_config(cfg)
    recorded = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.is_symlink():
            continue
        line = _reconcile_one(ledger, path)
        if line:
            recorded.append(line)
    return recorded


def _reconcile_one(ledger: Ledger, path: Path) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None  # its run finished meanwhile
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # its run is alive
        facts = _facts(path, os.read(fd, 1 << 16))
        if facts is None or not _dead(facts, path):
            return None
        line = _record(ledger, facts, _reason(path, facts))
        path.unlink(missing_ok=True)
        return line
    finally:
        os.close(fd)


def _facts(path: Path, data: bytes) -> dict[str, Any] | None:
    try:
        facts = json.loads(data)
        if isinstance(facts, dict) and facts.get("cadence") and facts.get("batch_ids"):
            return facts
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    log.warning("unreadable attempt marker %s left alone", path.name)
    return None


def _dead(facts: dict[str, Any], path: Path) -> bool:
    """No lock held (checked by the caller); on another host the lock may not reach us, so its
    marker must also be older than `STALE_AFTER_SECONDS`."""
    if facts.get("host") == socket.gethostname():
        return True
    age = datetime.now(UTC).timestamp() - path.stat().st_mtime
    return age > STALE_AFTER_SECONDS


def _reason(path: Path, facts: dict[str, Any]) -> str:
    who = (
        f"the run {facts.get('flow_run_id')} (pid {facts.get('pid')} on {facts.get('host')}, "
        f"started {facts.get('started_at')})"
    )
    if FAILED_MARK in path.name:
        error = unquote(path.name.split(FAILED_MARK, 1)[1])
        return f"{who} failed and could not record it (the ledger write failed too): {error}"
    return (
        f"interrupted: {who} ended without recording an outcome (killed: SIGKILL, out of "
        "memory, a pre-empted node — or it could not write at all)"
    )


def _record(ledger: Ledger, facts: dict[str, Any], reason: str) -> str | None:
    """`failed` for each batch with no entry since the attempt started (through the ledger's
    one writer, which does not take this run's own marker for the one recorded)."""
    from tasks.ledger import record_interrupted  # tasks.ledger calls `finish`: import here

    cadence, started = str(facts["cadence"]), str(facts.get("started_at", ""))
    batches = []
    for batch_id in facts["batch_ids"]:
        latest = ledger.latest(cadence, str(batch_id))
        if latest is None or latest.at < started:  # ISO UTC timestamps sort as strings
            batches.append(str(batch_id))
    if not batches:
        return None
    details = {
        "interrupted": "true",
        "attempt_flow_run": str(facts.get("flow_run_id")),
        "attempt_started": started,
        "recorded_by": _flow_run_id(),
    }
    record_interrupted(ledger, cadence, batches, reason, details)
    return f"{cadence} {batches}: {reason}"
