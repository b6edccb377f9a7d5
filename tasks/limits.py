"""One training run and one promotion at a time per pipeline: Prefect global concurrency limits
on a Prefect server, kernel file locks in the embedded default.

With a Prefect server (`PREFECT_API_URL` set) the limits are namespaced by the pipeline (its
registered model name, `registry.name`), so several evergreen pipelines share one server without
serialising each other:

- `evergreen-<name>-training` is held by every training task so the pipeline's cadences never
  train at once on its device;
- `evergreen-<name>-promotion` serialises compare-and-set promotions across workers and hosts.

They are created once, when missing (`evergreen deploy`, and the first flow run on a server),
with a limit of 1, and never updated afterwards: an operator who raised a limit or deactivated it
keeps that setting. A slot held by a process that is killed is freed when its lease expires (the
server's repossessor service).

The embedded default has no server that outlives a run: each CLI process starts an ephemeral
Prefect API on the shared SQLite database, whose lease storage lives in that process and whose
repossessor does not run. A SIGKILLed training run would leave its slot occupied in the database
forever, blocking every later run. So without a server the slots are `flock` locks under
`<home>/locks` (model_registry/locking.py), which the kernel releases when the holder dies; the
registry takes its own promotion lock there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import PREFECT_API_URL

from evergreen.config import TrainConfig
from model_registry.locking import promotion_lock

TaskT = TypeVar("TaskT")

DEFAULT_LIMIT = 1


def training_limit(pipeline: str) -> str:
    """The name of a pipeline's training slot."""
    return f"evergreen-{pipeline}-training"


def promotion_limit(pipeline: str) -> str:
    """The name of a pipeline's promotion slot."""
    return f"evergreen-{pipeline}-promotion"


def on_server() -> bool:
    """Whether runs talk to a Prefect server (else an ephemeral, per-process API)."""
    return bool(PREFECT_API_URL.value())


def ensure_limits(pipeline: str) -> list[str]:
    """Create the pipeline's concurrency limits on the Prefect server if they are missing.

    Existing limits are left exactly as they are (an operator's value wins). Without a server
    there is nothing to create (file locks are used).

    Returns:
        The names of the limits created by this call.
    """
    if not on_server():
        return []
    created = []
    with get_client(sync_client=True) as client:
        for name in (training_limit(pipeline), promotion_limit(pipeline)):
            try:
                client.read_global_concurrency_limit_by_name(name)
                continue
            except ObjectNotFound:
                pass
            try:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=DEFAULT_LIMIT)
                )
            except ObjectAlreadyExists:  # another flow created it first: theirs stands
                continue
            created.append(name)
    return created


@contextmanager
def training_slot(pipeline: str, lock_dir: Path, timeout_seconds: float = 3600) -> Iterator[None]:
    """Hold the pipeline's training slot while training."""
    if on_server():
        name = training_limit(pipeline)
        with concurrency(name, occupy=1, timeout_seconds=timeout_seconds, strict=True):
            yield
        return
    with promotion_lock(f"{pipeline}-training", lock_dir, timeout_seconds, "training"):
        yield


@contextmanager
def promotion_slot(pipeline: str, timeout_seconds: float = 300) -> Iterator[None]:
    """Hold the pipeline's promotion slot across the read-compare-set of the champion alias
    (without a server, the registry's own file lock does this)."""
    if not on_server():
        yield
        return
    name = promotion_limit(pipeline)
    with concurrency(name, occupy=1, timeout_seconds=timeout_seconds, strict=True):
        yield


def time_limited(training_task: TaskT, train: TrainConfig) -> TaskT:
    """`training_task` with the section's own time limit (`train.timeout_minutes`).

    Why: the decorators' limit is one hour for every pipeline; a GPU fine-tune of a large model
    can need several, and a limit that every run reaches fails every run.
    """
    task: Any = training_task
    return task.with_options(timeout_seconds=train.timeout_minutes * 60)  # type: ignore[no-any-return]
