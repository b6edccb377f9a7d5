"""The MLflow model registry of one evergreen pipeline: versions, aliases, promotion, rollback.

A version is a pyfunc model logged "from code" (`pyfunc_model.py`, no pickle) whose only
artifact is the checkpoint directory (docs/CONTRACTS.md). Its tags carry the lineage
(`evergreen.parent_version`, `evergreen.cadence`, …) and the sha256 of every checkpoint file
(`evergreen.sha256.<relpath>`), which `download` and every promotion verify, so a version whose
stored files changed after logging is never served. Alias `champion` is what serving loads,
`challenger` marks the version under evaluation (aliases and tags, no deprecated stages).

Promotion is compare-and-set under `locking.promotion_lock` (see there for what holds across
hosts); every champion change is a `PromotionEvent`, stored as a run in the bookkeeping
experiment `<experiment>-records` (`run_log.RunLog`), which `rollback` and `history` read.

This module holds the writes; reading, verified downloads and the names both share (aliases,
errors, `VersionInfo`) are `model_registry.versions`' (`RegistryReader`, the base of `Registry`).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow.exceptions import MlflowException

from model_registry import pyfunc_model
from model_registry.fault_hooks import hang_here
from model_registry.locking import promotion_lock
from model_registry.promotion_history import PromotionEvent, rollback_target
from model_registry.run_log import ensure_experiment, now_iso
from model_registry.run_record import RunRecord, log_record
from model_registry.versions import (
    CHALLENGER,
    CHAMPION,
    SHA_PREFIX,
    RegistryError,
    RegistryReader,
    VersionInfo,
)

if TYPE_CHECKING:
    from evergreen.config import EvergreenConfig

TAG_PREFIX = "evergreen."
IDEMPOTENCY_TAG = "evergreen.idempotency_key"
GATE_DECISION_TAG = "evergreen.gate_decision"  # "pass" | "fail", set when a version is registered
UNGATED = "UNGATED"  # starts the reason of a champion change to a version that never passed


class NoEarlierChampionError(RegistryError):
    """`rollback` without a version from a champion that has no earlier one to restore: the
    command ran and did not roll back (exit 1, `evergreen.errors`)."""


class UnknownVersionError(RegistryError):
    """`rollback --to N` names a version the registered model does not have (a usage error)."""


class StaleChampionError(RegistryError):
    """For callers that prefer an exception to `PromotionResult.stale` (see `raise_if_stale`)."""


@dataclass
class PromotionResult:
    promoted: bool
    version: str
    previous: str | None
    stale: bool
    reason: str

    def raise_if_stale(self) -> PromotionResult:
        """Return self, or raise StaleChampionError when the comparison was stale."""
        if self.stale:
            raise StaleChampionError(self.reason)
        return self


class Registry(RegistryReader):
    """One registered model: log versions, move aliases (CAS), roll back, read history.

    Reading and verified downloads are `RegistryReader`'s (`model_registry.versions`).
    """

    @classmethod
    def from_config(cls, cfg: EvergreenConfig) -> Registry:
        """The registry of a validated config (lock files under `<home>/locks`)."""
        return cls(
            cfg.tracking_uri,
            cfg.registry.name,
            experiment=cfg.registry.experiment,
            artifact_location=cfg.artifact_location,
            lock_dir=cfg.home_path / "locks",
        )

    # ---- logging -------------------------------------------------------------------------

    def log_version(
        self,
        checkpoint_dir: Path,
        *,
        lineage: dict[str, str],
        metrics: dict[str, float] | None = None,
        params: dict[str, str] | None = None,
        run_name: str | None = None,
        reports: dict[str, Path] | None = None,
        run_id: str | None = None,
        record: RunRecord | None = None,
        idempotency_key: str | None = None,
    ) -> VersionInfo:
        """Log a checkpoint directory as a new version of the registered model.

        With an `idempotency_key`, a version already registered under that key is returned
        instead of creating another: a retried step (Prefect task retry, flow retry) whose first
        attempt got as far as registering must not leave two versions of one challenger.

        Args:
            checkpoint_dir: a checkpoint written by `continual.checkpoint.save_checkpoint`.
            lineage: lineage facts; keys get the "evergreen." prefix on the version and run.
            metrics, params: logged on the run.
            run_name: name of the new run (ignored when `run_id` is given).
            reports: artifact name → local file/folder, logged under "reports/" on the run.
            run_id: log into this existing run instead of starting a new one.
            record: config, curves, datasets and evaluation to log on the run; its model
                metrics are linked to the logged model (`run_record`).
            idempotency_key: stored as tag `evergreen.idempotency_key` on the version.

        Returns:
            The new version (or the one already registered under `idempotency_key`).

        Raises:
            RegistryError: the checkpoint does not load/predict, a report is missing, or a
                file name cannot be an MLflow tag key.
        """
        for name, path in (reports or {}).items():
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise RegistryError(f"report name {name!r} must be a relative path inside reports/")
            if not Path(path).exists():
                raise RegistryError(f"report {name!r}: {path} does not exist")
        if idempotency_key:
            existing = self.find_version(IDEMPOTENCY_TAG, idempotency_key)
            if existing is not None:
                return existing
        tags = {TAG_PREFIX + k.removeprefix(TAG_PREFIX): str(v) for k, v in lineage.items()}
        if idempotency_key:
            tags[IDEMPOTENCY_TAG] = idempotency_key
        with tempfile.TemporaryDirectory(prefix="evergreen-log-") as tmp:
            try:
                staged, manifest, example, signature = pyfunc_model.prepare_checkpoint(
                    Path(checkpoint_dir), Path(tmp)
                )
            except Exception as exc:  # CheckpointError, ValueError, OSError: "not loggable"
                raise RegistryError(f"checkpoint {checkpoint_dir} cannot be logged: {exc}") from exc
            with (
                pyfunc_model.fluent_tracking(self.tracking_uri),
                pyfunc_model.logging_run(
                    self.client, run_id, run_name, self._experiment_id
                ) as active_run,
            ):
                pyfunc_model.log_run_data(tags, metrics, params, reports, Path(tmp) / "reports")
                info = pyfunc_model.log_pyfunc(staged, Path(tmp), example, signature)
                if record is not None:
                    log_record(record, active_run, info.model_id, self.client)
                version_tags = {**tags, **{SHA_PREFIX + k: v for k, v in manifest.items()}}
                hang_here("registry.run-logged")  # test hook: a run with no version yet
                with pyfunc_model.without_mlflow_prints():
                    mv = mlflow.register_model(info.model_uri, self.model_name, tags=version_tags)
        return self.get_version(str(mv.version))

    def record_event(self, event: PromotionEvent) -> None:
        """Append a champion change evergreen did not make itself (see `reconcile`); call under
        `promotion_lock`."""
        self._history.record(event)

    # ---- writing -------------------------------------------------------------------------

    def set_challenger(self, version: str) -> None:
        """Point alias `challenger` at `version` (which must exist)."""
        self._model_version(version)
        self.client.set_registered_model_alias(self.model_name, CHALLENGER, str(version))

    def clear_challenger(self, version: str) -> bool:
        """Remove alias `challenger` if it still points at `version` (a rejected or failed
        candidate is no longer under evaluation); True when it was removed.

        Another flow may have moved the alias to its own candidate since: that one is left.
        """
        if self._aliases().get(CHALLENGER) != str(version):
            return False
        try:
            self.client.delete_registered_model_alias(self.model_name, CHALLENGER)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
        return True

    def set_version_tags(self, version: str, tags: dict[str, str]) -> None:
        """Set tags on a version (e.g. the gate decision).

        Raises:
            RegistryError: a key is an integrity tag (those are written once, at logging).
        """
        protected = sorted(k for k in tags if k.startswith(SHA_PREFIX))
        if protected:
            raise RegistryError(f"tags {protected} are integrity records and cannot be changed")
        self._model_version(version)
        for key, value in tags.items():
            self.client.set_model_version_tag(self.model_name, str(version), key, str(value))

    def promote(
        self,
        version: str,
        *,
        expected_champion: str | None,
        reason: str,
        actor: str = "evergreen",
        flow_run_id: str | None = None,
    ) -> PromotionResult:
        """Make `version` the champion if the champion is still `expected_champion` (CAS).

        Args:
            version: the challenger to promote.
            expected_champion: the champion it was evaluated against (None: there was none).
            reason: why (the gate's decision), recorded in the history.
            actor: who promotes (a flow, a user).
            flow_run_id: the Prefect flow run, recorded in the history.

        Returns:
            promoted=True, or stale=True (the champion changed; nothing was touched), or
            promoted=False when `version` already is the champion.

        Raises:
            ArtifactIntegrityError: the version's stored files fail the sha256 check (the
                champion is unchanged).
            RegistryError: unknown version.
            locking.LockTimeoutError: another promotion held the lock too long.
        """
        version = str(version)
        expected = None if expected_champion is None else str(expected_champion)
        self._model_version(version)
        current = self._aliases().get(CHAMPION)
        if current != expected:  # cheap early exit: no need to download anything
            return _stale(version, current, expected)
        if current == version:
            return PromotionResult(False, version, current, False, f"v{version} already champion")
        self.verify_artifacts(version)  # before the lock: downloads can be slow
        with promotion_lock(self.model_name, self.lock_dir):
            aliases = self._aliases()
            current = aliases.get(CHAMPION)
            if current != expected:
                return _stale(version, current, expected)
            event = PromotionEvent(
                now_iso(), "promote", version, current, actor, reason, flow_run_id
            )
            self._move_champion(event, aliases)
        return PromotionResult(True, version, current, False, reason)

    def rollback(
        self,
        *,
        to: str | None = None,
        reason: str = "manual rollback",
        actor: str = "evergreen",
        flow_run_id: str | None = None,
    ) -> PromotionResult:
        """Restore an earlier champion and record a "rollback" event.

        Args:
            to: the version to restore; None = the champion the current one replaced, walking
                back past versions that were themselves rolled back from.
            reason, actor, flow_run_id: recorded in the history.

        Returns:
            promoted=True with `previous` = the champion rolled back from (promoted=False when
            `to` already is the champion).

        Raises:
            RegistryError: no champion, unknown version, or no earlier champion in the history.
            ArtifactIntegrityError: the target's stored files fail the sha256 check.
        """
        with promotion_lock(self.model_name, self.lock_dir):
            aliases = self._aliases()
            current = aliases.get(CHAMPION)
            events = self._history.events()
            target, decision = self._rollback_target(to, current, events)
            if target == current:
                return PromotionResult(False, target, current, False, f"v{target} already champion")
            was_champion = any(e.version == target for e in events)
            if decision != "pass" and not was_champion:  # --to a rejected challenger: allowed,
                # but never silently (as a hand move in the MLflow UI, `reconcile`)
                reason = (
                    f"{UNGATED}: v{target} never passed evergreen's gate (gate decision "
                    f"{decision!r}); {reason}"
                )
            self.verify_artifacts(target)
            event = PromotionEvent(
                now_iso(), "rollback", target, current, actor, reason, flow_run_id
            )
            self._move_champion(event, aliases)
        return PromotionResult(
            True, target, current, False, f"rolled back from v{current}: {reason}"
        )

    def check_rollback(self, to: str | None = None) -> str:
        """The version `rollback(to=to)` would restore, read without the lock and without moving
        anything, so a command can refuse a rollback that cannot happen before it starts a
        flow run that would fail on it. `rollback` checks again under the lock, so a champion
        moved in between is still caught.

        Raises:
            RegistryError: no champion; NoEarlierChampionError, UnknownVersionError: as
                `rollback`.
        """
        target, _ = self._rollback_target(to, self._aliases().get(CHAMPION), self._history.events())
        return target

    # ---- internals -----------------------------------------------------------------------

    def _rollback_target(
        self, to: str | None, current: str | None, events: list[PromotionEvent]
    ) -> tuple[str, str]:
        """(the version to restore, its gate decision tag) — or why there is none.

        Raises:
            RegistryError: no champion to roll back from.
            NoEarlierChampionError: `to` is None and the history has no earlier champion.
            UnknownVersionError: `to` names a version the registered model does not have.
        """
        if current is None:
            raise RegistryError(f"model {self.model_name!r} has no champion to roll back")
        target = str(to) if to is not None else rollback_target(reversed(events), current)
        if target is None:
            raise NoEarlierChampionError(
                f"no earlier champion to roll back to from v{current}: it was the first "
                "champion, or every champion before it was itself rolled back from; pass a "
                "version (--to N)"
            )
        try:
            decision = self._model_version(target).tags.get(GATE_DECISION_TAG, "none")
        except RegistryError as exc:
            if to is None:
                raise
            raise UnknownVersionError(f"--to {to}: {exc}") from None
        return target, decision

    def _move_champion(self, event: PromotionEvent, aliases: dict[str, str]) -> None:
        """Set the alias, drop a challenger alias on it, record the event, verify by re-reading.

        `aliases` is what was read under the lock just before (saves a round trip).
        """
        self.client.set_registered_model_alias(self.model_name, CHAMPION, event.version)
        if aliases.get(CHALLENGER) == event.version:
            self.client.delete_registered_model_alias(self.model_name, CHALLENGER)
        self._history.record(event)
        now = self._aliases().get(CHAMPION)
        if now != event.version:
            raise RegistryError(
                f"champion of {self.model_name!r} moved to v{now} while v{event.version} was"
                " being promoted: another promoter bypassed the lock (run promotions through the"
                " tasks layer, which holds the Prefect concurrency limit)"
            )

    def _experiment_id(self) -> str:
        return ensure_experiment(self.client, self.experiment, self.artifact_location)


def _stale(version: str, current: str | None, expected: str | None) -> PromotionResult:
    now = f"v{current}" if current else "none"
    against = f"v{expected}" if expected else "no champion"
    reason = (
        f"stale comparison: champion is now {now}, the challenger was evaluated against {against}"
    )
    return PromotionResult(False, version, current, True, reason)
