"""The MLflow model registry of one evergreen pipeline: versions, aliases, promotion, rollback.

A version is a pyfunc model logged "from code" (`pyfunc_model.py`, no pickle) whose only
artifact is the checkpoint directory (docs/CONTRACTS.md). Its tags carry the lineage
(`evergreen.parent_version`, `evergreen.cadence`, …) and the sha256 of every checkpoint file
(`evergreen.sha256.<relpath>`), which `download` and every promotion verify, so a version whose
stored files changed after logging is never served. Alias `champion` is what serving loads,
`challenger` marks the version under evaluation (aliases and tags, no deprecated stages).

Promotion is compare-and-set under `locking.promotion_lock` (see there for what holds across
hosts); every champion change is a `PromotionEvent`, stored as a run in the bookkeeping
experiment `<experiment>-records` (`ledger.RunLog`), which `rollback` and `history` read.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from continual.base_model import BaseModelError, check_checkpoint_base, hash_differences
from continual.lineage import ParentReference, ParentVersionError, read_parent
from model_registry import pyfunc_model
from model_registry.fault_hooks import hang_here
from model_registry.ledger import (
    PromotionEvent,
    PromotionHistory,
    RunLog,
    default_artifact_location,
    ensure_experiment,
    is_remote,
    now_iso,
    quote,
    records_experiment,
    rollback_target,
)
from model_registry.locking import promotion_lock
from model_registry.run_record import RunRecord, log_record

if TYPE_CHECKING:
    from evergreen.config import EvergreenConfig

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_PREFIX = "evergreen."
SHA_PREFIX = "evergreen.sha256."
IDEMPOTENCY_TAG = "evergreen.idempotency_key"
CHECKPOINT_SUBPATH = f"artifacts/{pyfunc_model.CHECKPOINT_ARTIFACT}"  # inside the logged model
_PARENT_LINK_LIMIT = 16


class RegistryError(Exception):
    """A registry operation cannot be done; the message says what to do instead."""


class StaleChampionError(RegistryError):
    """For callers that prefer an exception to `PromotionResult.stale` (see `raise_if_stale`)."""


class ArtifactIntegrityError(RegistryError):
    """A version's stored checkpoint files differ from the sha256 recorded when it was logged."""


class BaseModelChangedError(ArtifactIntegrityError):
    """A text version's pretrained base (which it stores no copy of) is missing or changed."""


class ParentVersionChangedError(ArtifactIntegrityError):
    """A version stored as parent + adapter references a parent version that is missing or
    whose files are not the ones recorded (`continual.lineage`)."""


@dataclass
class VersionInfo:
    version: str
    run_id: str | None
    tags: dict[str, str]
    aliases: list[str]
    created_ms: int
    source: str


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


class Registry:
    """One registered model: log versions, move aliases (CAS), roll back, read history."""

    def __init__(
        self,
        tracking_uri: str,
        model_name: str,
        *,
        experiment: str = "evergreen",
        artifact_location: str | None = None,
        lock_dir: Path | None = None,
    ) -> None:
        quote(model_name)  # names are used in search filters
        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self.experiment = experiment
        location = artifact_location or default_artifact_location(tracking_uri)
        self.artifact_location = None if is_remote(tracking_uri) else location
        self.lock_dir = lock_dir
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        log = RunLog(
            self.client,
            records_experiment(experiment),
            self.artifact_location,
            kind="promotion",
            legacy=(f"{experiment}-registry",),
        )
        self._history = PromotionHistory(log, model_name)

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
                mv = mlflow.register_model(info.model_uri, self.model_name, tags=version_tags)
        return self.get_version(str(mv.version))

    # ---- reading -------------------------------------------------------------------------

    def get_version(self, version: str) -> VersionInfo:
        """One version with its tags and aliases.

        Raises:
            RegistryError: the model or version does not exist.
        """
        mv = self._model_version(version)
        return _info(mv, {alias: str(mv.version) for alias in mv.aliases})

    def versions(self, limit: int = 20) -> list[VersionInfo]:
        """The newest `limit` versions, newest first (empty before the first one is logged)."""
        aliases = self._aliases()
        found = self.client.search_model_versions(
            f"name = {quote(self.model_name)}",
            max_results=limit,
            order_by=["version_number DESC"],
        )
        return [_info(mv, aliases) for mv in found]

    def find_version(self, tag: str, value: str) -> VersionInfo | None:
        """The newest version whose tag `tag` equals `value`, or None."""
        found = self.client.search_model_versions(
            f"name = {quote(self.model_name)} and tags.`{tag}` = {quote(value)}",
            max_results=1,
            order_by=["version_number DESC"],
        )
        return _info(found[0], self._aliases()) if found else None

    def champion(self) -> VersionInfo | None:
        """The version alias `champion` points to, or None before the first promotion."""
        version = self._aliases().get(CHAMPION)
        return self.get_version(version) if version else None

    def challenger(self) -> VersionInfo | None:
        """The version alias `challenger` points to, or None."""
        version = self._aliases().get(CHALLENGER)
        return self.get_version(version) if version else None

    def aliases(self) -> dict[str, str]:
        """alias → version for every alias of the registered model (empty before it exists)."""
        return self._aliases()

    def history(self, limit: int = 50) -> list[PromotionEvent]:
        """Champion changes (promotions, rollbacks, hand moves), newest first."""
        return self._history.events(limit)

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

    def download(self, version: str, dst: Path) -> Path:
        """Download a version's checkpoint into `dst` (new or empty) and verify every sha256.

        Returns:
            `dst`, holding the checkpoint files. Nothing is left at `dst` on failure.

        Raises:
            ArtifactIntegrityError: a file is missing, unexpected or differs from its sha256.
            RegistryError: unknown version, or `dst` is a non-empty folder.
        """
        version = str(version)
        manifest = self._manifest(version)
        dst = Path(dst)
        if dst.exists() and any(dst.iterdir()):
            raise RegistryError(f"download target {dst} is not empty; pass a new or empty folder")
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
        try:
            uri = self.client.get_model_version_download_uri(self.model_name, version)
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{uri.rstrip('/')}/{CHECKPOINT_SUBPATH}",
                dst_path=str(tmp),
                tracking_uri=self.tracking_uri,
            )
            problems = pyfunc_model.manifest_problems(Path(local), manifest)
            if problems:
                raise ArtifactIntegrityError(
                    f"model {self.model_name!r} v{version}: stored checkpoint files differ from"
                    f" what was logged ({'; '.join(problems)}); the artifact store copy was"
                    " modified or corrupted — do not serve this version"
                )
            if dst.exists():
                dst.rmdir()
            os.replace(local, dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dst

    def verify_artifacts(self, version: str, *, _links: int = 0) -> None:
        """Download a version into a temporary folder and check it (see `download`), and what
        it is stored against: the pretrained base of a text version (`continual.base_model`),
        or the parent version of one stored as parent + adapter (`continual.lineage`), whose
        registry hashes must be the recorded ones and which is verified the same way in turn.
        A version whose base or parent changed cannot be loaded, so it must not become the
        champion.

        Raises:
            ArtifactIntegrityError: as `download`; BaseModelChangedError: the base changed;
                ParentVersionChangedError: the parent is missing or changed.
        """
        with tempfile.TemporaryDirectory(prefix="evergreen-verify-") as tmp:
            checkpoint = self.download(version, Path(tmp) / "checkpoint")
            try:
                parent = read_parent(checkpoint)
                check_checkpoint_base(checkpoint)
            except ParentVersionError as exc:
                raise ParentVersionChangedError(
                    f"model {self.model_name!r} v{version}: {exc}"
                ) from exc
            except BaseModelError as exc:
                raise BaseModelChangedError(f"model {self.model_name!r} v{version}: {exc}") from exc
        if parent is not None:
            self._verify_parent(str(version), parent, _links)

    def _verify_parent(self, version: str, parent: ParentReference, links: int) -> None:
        """The parent's registry hashes are the recorded ones, and it verifies in turn."""
        where = f"model {self.model_name!r} v{version}: parent {parent.uri}"
        if links >= _PARENT_LINK_LIMIT:
            raise ParentVersionChangedError(f"{where}: more than {_PARENT_LINK_LIMIT} links")
        registry = (
            self
            if parent.model_name == self.model_name
            else Registry(self.tracking_uri, parent.model_name, lock_dir=self.lock_dir)
        )
        try:
            recorded = registry._manifest(parent.version)
        except RegistryError as exc:
            raise ParentVersionChangedError(f"{where}: {exc}") from exc
        changes = hash_differences(
            parent.manifest, recorded, unexpected="not in the recorded parent"
        )
        if changes:
            raise ParentVersionChangedError(
                f"{where} is not the version this one was stored against: {'; '.join(changes[:5])}"
            )
        try:
            registry.verify_artifacts(parent.version, _links=links + 1)
        except ArtifactIntegrityError as exc:
            raise ParentVersionChangedError(f"{where}: {exc}") from exc

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
            if current is None:
                raise RegistryError(f"model {self.model_name!r} has no champion to roll back")
            target = (
                str(to)
                if to is not None
                else rollback_target(reversed(self._history.events()), current)
            )
            if target is None:
                raise RegistryError(
                    f"no earlier champion to roll back to from v{current}: every predecessor in"
                    " the promotion history was itself rolled back; pass a version (--to N)"
                )
            self._model_version(target)
            if target == current:
                return PromotionResult(False, target, current, False, f"v{target} already champion")
            self.verify_artifacts(target)
            event = PromotionEvent(
                now_iso(), "rollback", target, current, actor, reason, flow_run_id
            )
            self._move_champion(event, aliases)
        return PromotionResult(
            True, target, current, False, f"rolled back from v{current}: {reason}"
        )

    # ---- internals -----------------------------------------------------------------------

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

    def _aliases(self) -> dict[str, str]:
        try:
            model = self.client.get_registered_model(self.model_name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise
        return {alias: str(version) for alias, version in model.aliases.items()}

    def _model_version(self, version: str) -> ModelVersion:
        try:
            return self.client.get_model_version(self.model_name, str(version))
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
        known = [v.version for v in self.versions(limit=10)]
        raise RegistryError(
            f"model {self.model_name!r} has no version {version!r} (newest: {known or 'none'})"
        )

    def _manifest(self, version: str) -> dict[str, str]:
        tags = self._model_version(version).tags
        manifest = {
            k.removeprefix(SHA_PREFIX): v for k, v in tags.items() if k.startswith(SHA_PREFIX)
        }
        if not manifest:
            raise ArtifactIntegrityError(
                f"model {self.model_name!r} v{version} has no {SHA_PREFIX}* tags: it was not"
                " logged by Registry.log_version, so its files cannot be verified"
            )
        return manifest


def _stale(version: str, current: str | None, expected: str | None) -> PromotionResult:
    now = f"v{current}" if current else "none"
    against = f"v{expected}" if expected else "no champion"
    reason = (
        f"stale comparison: champion is now {now}, the challenger was evaluated against {against}"
    )
    return PromotionResult(False, version, current, True, reason)


def _info(mv: ModelVersion, aliases: dict[str, str]) -> VersionInfo:
    version = str(mv.version)
    return VersionInfo(
        version=version,
        run_id=mv.run_id or None,
        tags=dict(mv.tags),
        aliases=sorted(a for a, v in aliases.items() if v == version),
        created_ms=int(mv.creation_timestamp or 0),
        source=str(mv.source or ""),
    )
