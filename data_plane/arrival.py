"""When has a batch arrived? Completion markers, manifests and a quiescence window.

A multi-file upload is not atomic: a folder that holds its first file may still be receiving the
rest. A batch counts as arrived only when

1. it holds `_SUCCESS` (the Hadoop/Spark convention: the producer writes it last), or
2. it holds `_manifest.json` listing every data file with its sha256, and every listed file is
   there with that checksum and no unlisted data file is (a mismatch keeps the batch pending,
   with the reason logged: the upload is incomplete or the files are not the ones announced), or
3. it has neither, holds at least one data file, and no file in it (hidden temp files included)
   changed for `quiescence_seconds` (`data.arrival_quiescence_seconds`) — for producers that write
   no marker.

The landing zone is listed once per call (`LandingZone.scan`); only manifests and the files they
list are read, and only for batches not yet processed.

Manifest format (`write_manifest` writes it)::

    {"files": [{"name": "part-0.parquet", "sha256": "<64 hex>"}, ...]}
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from data_plane.landing import (
    SUPPORTED_SUFFIXES,
    LandingZone,
    ObjectInfo,
    _is_data_file,
    unsafe_name,
)

log = logging.getLogger(__name__)

SUCCESS_MARKER = "_SUCCESS"
MANIFEST = "_manifest.json"


@dataclass(frozen=True)
class Arrival:
    """Whether one batch has arrived, and why (or why not yet)."""

    batch_id: str
    arrived: bool
    reason: str
    settles_in: float | None = None  # seconds until the quiescence rule accepts it, if that is all


def pending_batches(
    zone: LandingZone,
    processed: Collection[str],
    *,
    quiescence_seconds: float = 0.0,
    now: float | None = None,
) -> list[str]:
    """Batches that have arrived and are not processed yet, in batch-id order."""
    arrivals = batch_arrivals(zone, processed, quiescence_seconds=quiescence_seconds, now=now)
    return [a.batch_id for a in arrivals if a.arrived]


def batch_arrivals(
    zone: LandingZone,
    processed: Collection[str] = (),
    *,
    quiescence_seconds: float = 0.0,
    now: float | None = None,
    listing: dict[str, list[ObjectInfo]] | None = None,
) -> list[Arrival]:
    """The arrival state of every batch not in `processed`, from one listing of the zone
    (`listing`: one the caller just took, else a new one).

    Batches that have not arrived yet are logged with the reason (INFO; WARNING for a manifest
    that does not match the files).
    """
    done = set(processed)
    now = time.time() if now is None else now
    arrivals = []
    for batch_id, objects in (zone.scan() if listing is None else listing).items():
        if batch_id in done:
            continue
        arrival = arrival_of(zone, batch_id, objects, now=now, quiescence=quiescence_seconds)
        if not arrival.arrived:
            level = logging.INFO if arrival.reason.startswith("no ") else logging.WARNING
            log.log(level, "batch %s not taken yet: %s", batch_id, arrival.reason)
        arrivals.append(arrival)
    return arrivals


def listing_signature(objects: Iterable[ObjectInfo]) -> str:
    """The data files of one batch as a listing saw them (name, size, modification time),
    hashed. A batch quarantined under one signature and listed under another was changed in
    place since: `evergreen.pending` takes it again, so fixing an export in place is enough.
    Markers, manifests and hidden files do not count (touching `_SUCCESS` changes no data)."""
    digest = hashlib.sha256()
    for item in sorted(objects, key=lambda o: o.name):
        if item.name.startswith((".", "_")) or not item.name.lower().endswith(SUPPORTED_SUFFIXES):
            continue
        digest.update(f"{item.name}\x1f{item.size}\x1f{item.modified!r}\x1e".encode())
    return digest.hexdigest()[:16]


def arrival_of(
    zone: LandingZone, batch_id: str, objects: list[ObjectInfo], *, now: float, quiescence: float
) -> Arrival:
    """Apply the rule of the module docstring to one batch's listing."""
    problem = unsafe_name(batch_id)
    if problem:
        return Arrival(batch_id, False, f"not a safe batch id ({problem}): rename the folder")
    names = {o.name for o in objects}
    data = sorted(o.name for o in objects if _is_data_file(o.name, batch_id))
    if not data:
        return Arrival(batch_id, False, "no data file yet")
    if SUCCESS_MARKER in names:
        return Arrival(batch_id, True, f"{SUCCESS_MARKER} marker")
    if MANIFEST in names:
        problem = manifest_problem(zone, batch_id, data)
        return Arrival(batch_id, problem is None, problem or f"{MANIFEST} verified")
    quiet_for = now - max(o.modified for o in objects)
    if quiet_for >= quiescence:
        return Arrival(batch_id, True, f"no marker; unchanged for {quiet_for:.0f}s")
    return Arrival(
        batch_id,
        False,
        f"no {SUCCESS_MARKER} or {MANIFEST} and a file changed {quiet_for:.0f}s ago (waiting "
        f"for {quiescence:.0f}s without change, data.arrival_quiescence_seconds)",
        settles_in=max(quiescence - quiet_for, 0.0),
    )


def manifest_problem(zone: LandingZone, batch_id: str, data_files: list[str]) -> str | None:
    """What is wrong between `_manifest.json` and the batch's data files, or None."""
    try:
        listed = _read_manifest(zone.read_bytes(batch_id, MANIFEST))
    except (ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is not valid ({exc}); expected {{'files': [{{'name', 'sha256'}}]}}"
    missing = sorted(set(listed) - set(data_files))
    if missing:
        return f"{MANIFEST} lists {missing[:5]} which have not landed (upload incomplete?)"
    unlisted = sorted(set(data_files) - set(listed))
    if unlisted:
        return f"data files {unlisted[:5]} are not in {MANIFEST}: fix the manifest or the upload"
    for name, expected in sorted(listed.items()):
        actual = hashlib.sha256(zone.read_bytes(batch_id, name)).hexdigest()
        if actual != expected:
            return f"{name}: sha256 {actual[:12]}… differs from {MANIFEST} ({expected[:12]}…)"
    return None


def _read_manifest(raw: bytes) -> dict[str, str]:
    """name → sha256 (lower-case hex) of a manifest's files.

    Raises:
        ValueError, KeyError, TypeError: not the documented format.
    """
    files = json.loads(raw.decode("utf-8"))["files"]
    listed = {str(f["name"]): str(f["sha256"]).lower() for f in files}
    if not listed:
        raise ValueError("the file list is empty")
    for name, digest in listed.items():
        if "/" in name or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"entry {name!r}: a file name and a 64-hex sha256 are expected")
    return listed


def mark_complete(zone: LandingZone, batch_id: str) -> None:
    """Write `_SUCCESS` into a batch: the producer's last step."""
    zone.write_bytes(batch_id, SUCCESS_MARKER, b"")


def write_manifest(zone: LandingZone, batch_id: str) -> None:
    """Write `_manifest.json` for the batch's current data files (producer side, demo, tests)."""
    files = [
        {
            "name": ref.name,
            "sha256": hashlib.sha256(zone.read_bytes(batch_id, ref.name)).hexdigest(),
        }
        for ref in zone.list_files(batch_id)
    ]
    zone.write_bytes(batch_id, MANIFEST, json.dumps({"files": files}, indent=1).encode())
