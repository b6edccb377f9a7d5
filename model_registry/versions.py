"""Reading one registered model's versions and aliases, and verifying a version's stored files.

`model_registry.registry` says what a version is and how promotion works. This module is the
read-only half of it, apart from the writes (logging, aliases, promotion, rollback) because
reading needs no lock and reads are what most callers do: `RegistryReader` (the base of
`Registry`) gets versions, aliases and the promotion history, and downloads a version's
checkpoint only after checking every file against the sha256 tags written when it was logged,
and what the version is stored against (a text version's pretrained base, the parent version of
one stored as parent + adapter). It also holds the names both halves share: the aliases, the
integrity tag prefix, the errors and `VersionInfo`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from continual.base_model import BaseModelError, check_checkpoint_base, hash_differences
from continual.lineage import ParentReference, ParentVersionError, read_parent
from model_registry import pyfunc_model
from model_registry.promotion_history import PromotionEvent, PromotionHistory
from model_registry.run_log import (
    RunLog,
    default_artifact_location,
    is_remote,
    quote,
    records_experiment,
)

CHAMPION = "champion"
CHALLENGER = "challenger"
SHA_PREFIX = "evergreen.sha256."
CHECKPOINT_SUBPATH = f"artifacts/{pyfunc_model.CHECKPOINT_ARTIFACT}"  # inside the logged model
_PARENT_LINK_LIMIT = 16


class RegistryError(Exception):
    """A registry operation cannot be done; the message says what to do instead."""


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


class RegistryReader:
    """One registered model, read only: versions, aliases, history, verified downloads."""

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

    # ---- verified downloads --------------------------------------------------------------

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
            else type(self)(self.tracking_uri, parent.model_name, lock_dir=self.lock_dir)
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

    # ---- internals -----------------------------------------------------------------------

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
