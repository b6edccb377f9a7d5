"""Notice champion moves made outside evergreen (the MLflow UI, `set_registered_model_alias`).

evergreen records every champion change it makes (`PromotionHistory`), so the newest event's
version is the champion it last set. If the alias now points elsewhere, someone moved it by
hand: `reconcile_champion` records that as a `manual` event (actor "outside evergreen") so it
shows in `evergreen history` and `rollback` can walk back past it, and flags it when the
version never passed evergreen's gate (its `evergreen.gate_decision` tag is not `pass`: a
rejected challenger, or a version logged by something else).

Flows call it when they start, and `evergreen history` / `status` before they show anything
(MLflow OSS has no alias-change notification a flow could rely on everywhere, so reconciliation
is the mechanism that works on every store).
"""

from __future__ import annotations

from dataclasses import dataclass

from model_registry.ledger import PromotionEvent, now_iso
from model_registry.locking import promotion_lock
from model_registry.registry import CHAMPION, Registry, RegistryError

MANUAL = "manual"
OUTSIDE = "outside evergreen"
UNGATED = "UNGATED"


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
        decision = registry.get_version(current).tags.get("evergreen.gate_decision", "none")
    except RegistryError:
        decision = "none"
    moved = f"champion moved from {was} to v{current} outside evergreen"
    if decision == "pass":
        return False, f"{moved}; v{current} had passed the gate"
    return True, (
        f"{UNGATED}: {moved}, but v{current} never passed evergreen's gate (gate decision "
        f"{decision!r}); roll back with `evergreen rollback` unless this was intended"
    )
