"""Notice champion moves made outside evergreen (the MLflow UI, `set_registered_model_alias`).

evergreen records every champion change it makes (`PromotionHistory`), so the newest event's
version is the champion it last set. If the alias now points elsewhere, someone moved it by
hand: `reconcile_champion` records that as a `manual` event (actor "outside evergreen") so it
shows in `evergreen history` and `rollback` can walk back past it, and flags it when the
version never passed evergreen's gate (its `evergreen.gate_decision` tag is not `pass`: a
rejected challenger, or a version logged by something else).

`clear_abandoned` removes what a run SIGKILLed during registration leaves: a `challenger` alias
on a version nobody will decide on, and MLflow runs stuck in RUNNING.

Flows call `reconcile_champion` when they start, and `evergreen history` / `status` before they show anything
(MLflow OSS has no alias-change notification a flow could rely on everywhere, so reconciliation
is the mechanism that works on every store).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from model_registry.locking import promotion_lock
from model_registry.promotion_history import PromotionEvent
from model_registry.registry import GATE_DECISION_TAG, UNGATED, Registry
from model_registry.run_log import now_iso
from model_registry.versions import CHALLENGER, CHAMPION, RegistryError

MANUAL = "manual"
OUTSIDE = "outside evergreen"


@dataclass(frozen=True)
class Reconciliation:
    """What reconciliation found: the event it recorded (None: nothing had moved)."""

    event: PromotionEvent | None
    ungated: bool = False


def reconcile_champion(registry: Registry) -> Reconciliation:
    """Record a hand-made champion change, if any (under the promotion lock, so a promotion in
    progress — alias set, event not yet written — is never mistaken for one).

    Returns:
        The recorded event (None when the alias is where evergreen left it) and whether the
        new champion is ungated.
    """
    with promotion_lock(registry.model_name, registry.lock_dir):
        current = registry.aliases().get(CHAMPION)
        latest = registry.history(limit=1)
        recorded = latest[0].version if latest else None
        if (current or None) == (recorded or None):
            return Reconciliation(None)
        ungated, reason = _judge(registry, current, recorded)
        event = PromotionEvent(
            now_iso(), MANUAL, current or "", recorded or None, OUTSIDE, reason, None
        )
        registry.record_event(event)
    return Reconciliation(event, ungated)


def _judge(registry: Registry, current: str | None, recorded: str | None) -> tuple[bool, str]:
    """(ungated?, the reason recorded) for a champion found at `current` instead of `recorded`."""
    was = f"v{recorded}" if recorded else "no champion"
    if current is None:
        return False, f"the champion alias was removed outside evergreen (it was {was})"
    try:
        decision = registry.get_version(current).tags.get(GATE_DECISION_TAG, "none")
    except RegistryError:
        decision = "none"
    moved = f"champion moved from {was} to v{current} outside evergreen"
    if decision == "pass":
        return False, f"{moved}; v{current} had passed the gate"
    return True, (
        f"{UNGATED}: {moved}, but v{current} never passed evergreen's gate (gate decision "
        f"{decision!r}); roll back with `evergreen rollback` unless this was intended"
    )


# ---- what a killed run leaves in the registry ------------------------------------------------

DECISION_TAG = "evergreen.decision"  # set by promote_or_reject: promoted | rejected
ABANDONED = "abandoned"
# A live run takes minutes from registering its version to deciding on it (the promotion slot
# waits at most 300 s) and from starting an MLflow run to ending it; an hour is far beyond both,
# the same floor as the staging sweep (tasks.staging.STALE_AFTER_SECONDS).
ABANDONED_AFTER_SECONDS = 3600.0


@dataclass(frozen=True)
class Cleanup:
    """What `clear_abandoned` did: the challenger version it unaliased (None: none) and the
    ids of the orphan MLflow runs it marked KILLED."""

    challenger: str | None = None
    killed_runs: tuple[str, ...] = ()


def clear_abandoned(
    registry: Registry,
    experiments: list[str],
    *,
    older_than: float = ABANDONED_AFTER_SECONDS,
    now: float | None = None,
) -> Cleanup:
    """Undo what a run killed during registration left behind (flows call it when they start).

    - `challenger` is cleared when its version is no longer under evaluation: it carries a
      decision (`evergreen.decision`: its run decided but died before removing the alias), or it
      has none and was registered more than `older_than` seconds ago (its run died between
      registering and deciding). Such a version is tagged `evergreen.decision=abandoned`. A
      younger undecided challenger belongs to a run that may still be evaluating it and is kept.
      Promotion never reads `challenger`, so even a wrongly cleared alias cannot change what is
      served; it only stops marking the candidate.
    - MLflow runs still RUNNING in `experiments` that started more than `older_than` seconds ago
      (a run killed while logging its model or a bookkeeping record) are marked KILLED, so the
      UI stops showing them as in progress. Nothing reads such a run: ledger, history and
      memory only read FINISHED records, and a version is only served through its alias.
    """
    now = time.time() if now is None else now
    cleared = _clear_stale_challenger(registry, older_than, now)
    killed = _kill_orphan_runs(registry, experiments, older_than, now)
    return Cleanup(cleared, tuple(killed))


def _clear_stale_challenger(registry: Registry, older_than: float, now: float) -> str | None:
    version = registry.aliases().get(CHALLENGER)
    if not version:
        return None
    try:
        info = registry.get_version(version)
    except RegistryError:  # the version was deleted: the alias went with it
        return None
    decided = info.tags.get(DECISION_TAG)
    if not decided and now - info.created_ms / 1000 < older_than:
        return None  # possibly a live run's candidate under evaluation
    if not decided:
        registry.set_version_tags(version, {DECISION_TAG: ABANDONED})
    # re-checked just before the delete: a run that moved the alias meanwhile keeps it
    return version if registry.clear_challenger(version) else None


def _kill_orphan_runs(
    registry: Registry, experiments: list[str], older_than: float, now: float
) -> list[str]:
    ids = []
    for name in experiments:
        found = registry.client.get_experiment_by_name(name)
        if found is not None:
            ids.append(found.experiment_id)
    if not ids:
        return []
    cutoff_ms = int((now - older_than) * 1000)
    runs = registry.client.search_runs(
        ids, filter_string=f"attributes.status = 'RUNNING' and attributes.start_time < {cutoff_ms}"
    )
    for run in runs:
        # set_terminated, not update_run: only it records an end time (the "View run" line it
        # prints on servers is off under the CLI's MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT)
        registry.client.set_terminated(run.info.run_id, "KILLED", end_time=int(now * 1000))
    return [run.info.run_id for run in runs]
