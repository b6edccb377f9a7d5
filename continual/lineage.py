"""A version stored as its parent version + what it changed: the reference, and finding the parent.

A daily LoRA update on a fine-tuned champion leaves the champion's weights untouched (it trains
an adapter and, for a text classifier, refits the head). Stored against the pretrained base it
would carry the champion's trained weights again (42.6 MB on MiniLM); stored against its parent
it is its adapter and head. `parent.json` (`ParentReference`) records which registered version
that parent is and the sha256 of every file of its checkpoint (the same digests as the parent's
`evergreen.sha256.*` registry tags), so a parent that changed or disappeared is refused.

Where the parent comes from when the version is loaded (`resolve_parent`): nothing is bundled.
The parent's checkpoint is downloaded from the model registry — first the registry this process
is pointed at (`MLFLOW_REGISTRY_URI`/`MLFLOW_TRACKING_URI`, which `mlflow.set_tracking_uri` sets:
what `models:/<name>@champion` was resolved against),
then the registry URI recorded when the version was saved — into a content-addressed cache
(`$EVERGREEN_PARENT_CACHE`, else `$XDG_CACHE_HOME/evergreen/parents` or
`~/.cache/evergreen/parents`), and its files are hashed against the recorded digests on every
load, cached or not. Whatever registry answers, only the recorded bytes are accepted.

Chains are bounded (`MAX_PARENT_LINKS`): a version whose parent is already that many links from
a version stored against the base is stored against the base again, so loading builds at most
`MAX_PARENT_LINKS + 1` models however long the lineage gets.

Torch-free: the registry checks a version's parent before promoting it without importing torch.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote

from continual.base_model import (
    BaseModelError,
    JsonReference,
    combined_sha256,
    hash_differences,
)

PARENT_FILE = "parent.json"
FORMAT = "evergreen.parent/1"
MAX_PARENT_LINKS = 3  # links before a version is stored against the base again
# the checkpoint inside a logged evergreen model (model_registry.versions.CHECKPOINT_SUBPATH)
CHECKPOINT_SUBPATH = "artifacts/checkpoint"


_LOCAL_COPIES: dict[tuple[str, str], Path] = {}  # (model, version) → a local checkpoint copy


class ParentVersionError(BaseModelError):
    """The parent version a version is stored against is missing, unreachable or changed."""


@dataclass(frozen=True)
class ParentSource:
    """Where a loaded version came from, so a child can reference it: registry coordinates and
    the local copy of its checkpoint (downloaded and verified against the registry's hashes)."""

    model_name: str
    version: str
    registry_uri: str
    directory: Path


@dataclass(frozen=True)
class ParentReference(JsonReference):
    """The content of `parent.json`.

    Attributes:
        model_name, version: the registered parent (`models:/<model_name>/<version>`).
        registry_uri: the registry it was registered in when this version was saved (tried
            after the registry of the loading process).
        manifest: relative path → sha256 of every file of the parent's checkpoint.
        sha256: digest of `manifest` (one value to show and compare).
        depth: links from here to a version stored against the base (1: the parent is).
        from_parent_tensors: how many state-dict entries come from the parent.
        from_parent_sums: entry → [sum, sum of squares] (float64) of the tensors taken from the
            parent as it loaded when this version was saved; compared to 1e-6 relative, not
            bit-exactly, because a parent's adapter is merged by a matmul whose last bits vary
            between CPUs.
        stored_tensors: entries this version stores itself.
    """

    FORMAT: ClassVar[str] = FORMAT

    model_name: str
    version: str
    registry_uri: str
    manifest: dict[str, str]
    sha256: str
    depth: int = 1
    from_parent_tensors: int = 0
    from_parent_sums: dict[str, list[float]] = field(default_factory=dict)
    stored_tensors: int = 0
    format: str = FORMAT

    @property
    def uri(self) -> str:
        return f"models:/{self.model_name}/{self.version}"


ParentResolver = Callable[[ParentReference], Path]


def read_parent(checkpoint: Path) -> ParentReference | None:
    """A checkpoint's `parent.json`, or None for a version not stored against a parent.

    Raises:
        ParentVersionError: the file exists but cannot be parsed.
    """
    path = checkpoint / PARENT_FILE
    if not path.is_file():
        return None
    try:
        return ParentReference.from_json(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ParentVersionError(f"{path}: not a valid parent reference ({exc})") from exc


def directory_manifest(directory: Path) -> dict[str, str]:
    """relative posix path → sha256 of every file under `directory` (what the registry records
    as a version's `evergreen.sha256.*` tags)."""
    return {
        path.relative_to(directory).as_posix(): file_sha256(path)
        for path in sorted(p for p in directory.rglob("*") if p.is_file())
    }


def depth_of(checkpoint: Path) -> int:
    """Links from `checkpoint` to a version stored against its base (0: it is one)."""
    reference = read_parent(checkpoint)
    return 0 if reference is None else reference.depth


def verify_parent_files(reference: ParentReference, directory: Path) -> None:
    """Check a local copy of the parent against the recorded digests.

    Raises:
        ParentVersionError: a file missing, added or changed (named in the message).
    """
    problems = hash_differences(
        reference.manifest, directory_manifest(directory), unexpected="not in the recorded parent"
    )
    if problems:
        raise ParentVersionError(
            f"parent {reference.uri} (sha256 {reference.sha256[:12]}…) is not the version this "
            f"one was stored against: {'; '.join(problems[:5])}. The version holds only its "
            "adapter and head; restore that parent version in the registry to load it"
        )


def parent_cache() -> Path:
    """Where parent checkpoints are cached (content-addressed; safe to delete)."""
    explicit = os.environ.get("EVERGREEN_PARENT_CACHE")
    if explicit:
        return Path(explicit)
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "evergreen" / "parents"


def remember_local_copy(source: ParentSource) -> None:
    """Note a verified local copy of a registered version (a flow's version cache), so a child
    saved or loaded in this process finds its parent there instead of downloading it again.
    A copy that no longer matches is ignored (`resolve_parent` hashes it first)."""
    _LOCAL_COPIES[(source.model_name, source.version)] = source.directory


def resolve_parent(reference: ParentReference) -> Path:
    """The parent's checkpoint as a local folder whose files match `reference.manifest`:
    a copy this process already holds, the cache, else a download from the registry (module
    docstring).

    Raises:
        ParentVersionError: no registry holds the parent with the recorded files.
    """
    local = _LOCAL_COPIES.get((reference.model_name, reference.version))
    if local is not None and local.is_dir():
        try:
            verify_parent_files(reference, local)
            return local
        except ParentVersionError:
            pass  # pruned, replaced or another registry's version: use the cache/registry
    target = (
        parent_cache()
        / quote(reference.model_name, safe="")
        / (f"{quote(reference.version, safe='')}-{reference.sha256[:16]}")
    )
    if target.is_dir():
        try:
            verify_parent_files(reference, target)
            return target
        except ParentVersionError:  # a damaged cache entry: fetch it again
            shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for uri in _registry_uris(reference):
        try:
            _download(reference, uri, target)
            return target
        except ParentVersionError as exc:
            errors.append(f"{uri}: {exc}")
        except Exception as exc:  # unreachable server, unknown version, …: try the next one
            errors.append(f"{uri}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    raise ParentVersionError(
        f"parent {reference.uri} of this version cannot be loaded from any registry tried "
        f"({' | '.join(errors)}); the version stores only its adapter and head and needs its "
        "parent from the registry it was registered in"
    )


def _registry_uris(reference: ParentReference) -> list[str]:
    """The registry this process was pointed at, then the recorded one. Only an explicitly set
    URI counts (`mlflow.set_tracking_uri`/`set_registry_uri` export it too): MLflow's default
    would create an empty `mlflow.db` in the working directory."""
    current = os.environ.get("MLFLOW_REGISTRY_URI") or os.environ.get("MLFLOW_TRACKING_URI")
    return list(dict.fromkeys(u for u in (current, reference.registry_uri) if u))


def _download(reference: ParentReference, uri: str, target: Path) -> None:
    """Download the parent from the registry at `uri` into `target` (whole or not at all)."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    source = client.get_model_version_download_uri(reference.model_name, reference.version)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{source.rstrip('/')}/{CHECKPOINT_SUBPATH}",
                dst_path=str(tmp),
                tracking_uri=uri,
            )
        )
        verify_parent_files(reference, local)
        try:
            os.replace(local, target)
        except OSError:  # another process cached it meanwhile: use theirs (verified on use)
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def reference_to(source: ParentSource) -> ParentReference:
    """A reference to `source` as it is on disk now (tensor facts left for the caller)."""
    manifest = directory_manifest(source.directory)
    return ParentReference(
        model_name=source.model_name,
        version=source.version,
        registry_uri=source.registry_uri,
        manifest=manifest,
        sha256=combined_sha256(manifest),
        depth=depth_of(source.directory) + 1,
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
