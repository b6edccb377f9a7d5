"""Prefect global concurrency limits: one training slot per pipeline, one promotion at a time.

Names are namespaced by the pipeline (its registered model name, `registry.name`), so several
evergreen pipelines can share one Prefect server without serialising each other:

- `evergreen-<name>-training` is held by every training task so the pipeline's cadences never
  train at once on its device;
- `evergreen-<name>-promotion` serialises compare-and-set promotions across workers and hosts;
  the registry's file lock and re-check make promotion safe on one host even without a server.

The limits are created once, when missing (`evergreen deploy`, and the first flow run on a
server), with a limit of 1. They are never updated afterwards: an operator who raised a limit or
deactivated it in the UI keeps that setting.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

DEFAULT_LIMIT = 1


def training_limit(pipeline: str) -> str:
    """The name of a pipeline's training slot."""
    return f"evergreen-{pipeline}-training"


def promotion_limit(pipeline: str) -> str:
    """The name of a pipeline's promotion slot."""
    return f"evergreen-{pipeline}-promotion"


def ensure_limits(pipeline: str) -> list[str]:
    """Create the pipeline's concurrency limits on the current Prefect API if they are missing.

    Existing limits are left exactly as they are (an operator's value wins).

    Returns:
        The names of the limits created by this call.
    """
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
def training_slot(pipeline: str, timeout_seconds: float | None = 3600) -> Iterator[None]:
    """Hold the pipeline's training slot while training."""
    name = training_limit(pipeline)
    with concurrency(name, occupy=1, timeout_seconds=timeout_seconds, strict=True):
        yield


@contextmanager
def promotion_slot(pipeline: str, timeout_seconds: float | None = 300) -> Iterator[None]:
    """Hold the pipeline's promotion slot across the read-compare-set of the champion alias."""
    name = promotion_limit(pipeline)
    with concurrency(name, occupy=1, timeout_seconds=timeout_seconds, strict=True):
        yield
