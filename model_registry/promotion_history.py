"""The champion changes of a registered model, and which version a rollback restores.

Each event is one record of the bookkeeping experiment (`model_registry.run_log.RunLog`, kind
`promotion`): what `Registry.rollback`, reconciliation and `evergreen status` read.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from model_registry.run_log import RunLog, quote, run_seq


@dataclass
class PromotionEvent:
    """One champion change: who moved the alias from which version to which, when and why."""

    at: str
    action: str  # "promote" | "rollback" | "manual" (a hand move noticed by reconciliation)
    version: str
    previous: str | None
    actor: str
    reason: str
    flow_run_id: str | None


class PromotionHistory:
    """The champion changes of one registered model (runs tagged with its name)."""

    def __init__(self, log: RunLog, model_name: str) -> None:
        self.log = log
        self.model_name = model_name
        self._filter = f"tags.`evergreen.model` = {quote(model_name)}"

    def record(self, event: PromotionEvent) -> None:
        """Append an event, ordered after every event already recorded (call under the lock)."""
        latest = self.log.search(self._filter, limit=1)
        fields = {"model": self.model_name, **{k: v for k, v in vars(event).items() if v}}
        tags = {f"evergreen.{k}": str(v)[:5000] for k, v in fields.items()}
        after = run_seq(latest[0]) if latest else 0
        self.log.append(tags, run_name=f"{event.action}-v{event.version}", after=after)

    def events(self, limit: int | None = None) -> list[PromotionEvent]:
        """Events newest first (all of them when limit=None)."""
        return [_promotion_event(run.data.tags) for run in self.log.search(self._filter, limit)]


def _promotion_event(tags: dict[str, str]) -> PromotionEvent:
    def get(key: str) -> str:
        return tags.get(f"evergreen.{key}", "")

    return PromotionEvent(
        at=get("at"),
        action=get("action"),
        version=get("version"),
        previous=get("previous") or None,
        actor=get("actor"),
        reason=get("reason"),
        flow_run_id=get("flow_run_id") or None,
    )


def rollback_target(events: Iterable[PromotionEvent], current: str) -> str | None:
    """The champion to restore when rolling back from `current` (pure, tested directly).

    Each version's predecessor is the `previous` of its latest promotion (the champion it was
    gated against). Walk that chain from `current`, skipping versions that were rolled back
    from and not made champion again since; stop at a cycle or the start of the history.
    """
    predecessor: dict[str, str | None] = {}
    rolled_back_from: set[str] = set()
    for event in events:
        if event.action in ("promote", "manual"):
            predecessor[event.version] = event.previous
        elif event.action == "rollback" and event.previous is not None:
            rolled_back_from.add(event.previous)
        rolled_back_from.discard(event.version)
    seen = {current}
    candidate = predecessor.get(current)
    while candidate is not None and candidate not in seen:
        if candidate not in rolled_back_from:
            return candidate
        seen.add(candidate)
        candidate = predecessor.get(candidate)
    return None
