"""The pipeline's data memory in MLflow: what every accepted batch left behind, apart from models.

Accepted data must not be lost because a challenger was rejected: a daily batch whose LoRA
update did not pass the gate still belongs in the replay buffer, its held-out rows still measure
later challengers, and its value ranges still widen what validation expects. So the memory
(replay buffer, held-out rows per role, data profile, the batch ids it holds) is not a property
of a model version; it is a chain of snapshots, each a finished MLflow run in the experiment
`<experiment>-memory` whose artifacts are the snapshot's directory and whose tags record the
parent snapshot, the batch ids and the sha256 of every file (checked on download, as for model
versions). Model versions record which snapshot they were trained with
(`evergreen.memory_run`), so "what has the champion learned" is a look-up, not a guess.

Writing is compare-and-set: `commit(..., parent=head)` under the pipeline's lock fails with
`StaleMemoryError` if another flow committed first, and the caller re-applies its batches to the
new head (adding a batch the memory already holds is a no-op, so the retry is safe).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Run, RunTag

from model_registry import pyfunc_model
from model_registry.locking import promotion_lock
from model_registry.run_log import RunLog, default_artifact_location, is_remote, run_seq

SNAPSHOT_ARTIFACT = "memory"
SHA_PREFIX = "evergreen.sha256."
_BATCH_TAG_LIMIT = 4000


class StaleMemoryError(RuntimeError):
    """Another flow committed a memory snapshot after this one read the head."""


class MemoryIntegrityError(RuntimeError):
    """A snapshot's stored files differ from the sha256 recorded when it was committed."""


@dataclass(frozen=True)
class MemoryRef:
    """One committed snapshot."""

    run_id: str
    seq: int
    parent: str | None
    n_batches: int


class MemoryStore:
    """Read and append snapshots of one pipeline's data memory (see the module docstring)."""

    def __init__(
        self,
        tracking_uri: str,
        *,
        experiment: str,
        artifact_location: str | None = None,
        lock_name: str = "memory",
        lock_dir: Path | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        location = artifact_location or default_artifact_location(tracking_uri)
        self.log = RunLog(self.client, experiment, None if is_remote(tracking_uri) else location)
        self.lock_name = lock_name
        self.lock_dir = lock_dir

    def head(self) -> MemoryRef | None:
        """The latest snapshot, or None before the first batch was accepted."""
        runs = self.log.search("attributes.status = 'FINISHED'", limit=1)
        return _ref(runs[0]) if runs else None

    def get(self, run_id: str) -> MemoryRef:
        """One snapshot by run id."""
        return _ref(self.client.get_run(run_id))

    def download(self, ref: MemoryRef, dst: Path) -> Path:
        """Download a snapshot into `dst` (new or empty) and verify every file's sha256.

        Raises:
            MemoryIntegrityError: a file is missing, unexpected or modified.
        """
        dst = Path(dst)
        if dst.exists() and any(dst.iterdir()):
            raise ValueError(f"download target {dst} is not empty")
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    run_id=ref.run_id,
                    artifact_path=SNAPSHOT_ARTIFACT,
                    dst_path=str(tmp),
                    tracking_uri=self.tracking_uri,
                )
            )
            tags = self.client.get_run(ref.run_id).data.tags
            expected = {
                k[len(SHA_PREFIX) :]: v for k, v in tags.items() if k.startswith(SHA_PREFIX)
            }
            problems = pyfunc_model.manifest_problems(local, expected)
            if problems:
                raise MemoryIntegrityError(
                    f"memory snapshot {ref.run_id}: stored files differ from what was committed "
                    f"({'; '.join(problems[:5])}); restore them or commit a new snapshot"
                )
            if dst.exists():
                dst.rmdir()
            shutil.move(str(local), dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dst

    def fetch_file(self, run_id: str, relative: str, sha256: str, dst: Path) -> Path:
        """Download one file of snapshot `run_id` (`relative` to its snapshot folder) into the
        folder `dst` and check it against `sha256` (recorded by the snapshot that refers to it).

        Later snapshots refer to the held-out rows an earlier snapshot stored instead of
        storing them again; this reads such rows back.

        Raises:
            MemoryIntegrityError: the stored file differs from `sha256`.
        """
        dst.mkdir(parents=True, exist_ok=True)
        local = Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id,
                artifact_path=f"{SNAPSHOT_ARTIFACT}/{relative}",
                dst_path=str(dst),
                tracking_uri=self.tracking_uri,
            )
        )
        actual = pyfunc_model.file_sha256(local)
        if actual != sha256:
            raise MemoryIntegrityError(
                f"memory snapshot {run_id}: {relative} has sha256 {actual[:12]}… but "
                f"{sha256[:12]}… was recorded by the snapshot referring to it"
            )
        return local

    def commit(self, directory: Path, *, parent: str | None, batch_ids: list[str]) -> MemoryRef:
        """Append the snapshot in `directory` if the head is still `parent` (compare-and-set).

        Raises:
            StaleMemoryError: the head moved since `parent` was read.
        """
        manifest = pyfunc_model.checkpoint_manifest(Path(directory))
        with promotion_lock(self.lock_name, self.lock_dir):
            head = self.head()
            if (head.run_id if head else None) != parent:
                raise StaleMemoryError(
                    f"memory head is {head.run_id if head else None}, not {parent}: another flow "
                    "accepted data meanwhile"
                )
            run = self.client.create_run(
                str(self.log.experiment_id()), run_name=f"memory-{len(batch_ids)}-batches"
            )
            run_id = run.info.run_id
            try:
                self.client.log_artifacts(run_id, str(directory), SNAPSHOT_ARTIFACT)
                tags = {
                    "evergreen.memory.parent": parent or "none",
                    "evergreen.memory.n_batches": str(len(batch_ids)),
                    "evergreen.memory.batches": ",".join(batch_ids)[-_BATCH_TAG_LIMIT:],
                    **{SHA_PREFIX + k: v for k, v in manifest.items()},
                }
                seq = RunLog.next_seq(head.seq if head else 0)
                stamp = int(time.time() * 1000)
                self.client.log_batch(
                    run_id,
                    metrics=[Metric("seq", float(seq), stamp, 0)],
                    tags=[RunTag(k, v) for k, v in tags.items()],
                )
            except BaseException:
                self.client.delete_run(run_id)  # never leave a half-written head behind
                raise
            # FINISHED last: `head()` only sees complete snapshots.
            self.client.update_run(run_id, status="FINISHED")
        return self.get(run_id)  # as stored (seq is a float metric), so it equals head()


def _ref(run: Run) -> MemoryRef:
    tags = run.data.tags
    parent = tags.get("evergreen.memory.parent")
    return MemoryRef(
        run_id=run.info.run_id,
        seq=run_seq(run),
        parent=None if parent in (None, "none") else parent,
        n_batches=int(tags.get("evergreen.memory.n_batches", "0")),
    )
