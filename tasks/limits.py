"""Prefect global concurrency limits: one training slot per device, one promotion at a time.

`gpu` is held by every training task so cadences never train at once on one device (the name is
the Prefect convention for the accelerator slot; on a CPU host it guards the cores the same way).
`evergreen-promotion` serialises compare-and-set promotions across workers and hosts; the
registry's file lock and re-check make promotion safe on one host even without a Prefect server.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency

TRAINING_SLOT = "gpu"
PROMOTION_SLOT = "evergreen-promotion"
LIMITS = {TRAINING_SLOT: 1, PROMOTION_SLOT: 1}


def ensure_limits() -> None:
    """Create the global concurrency limits on the current Prefect API if they are missing."""
    with get_client(sync_client=True) as client:
        for name, limit in LIMITS.items():
            client.upsert_global_concurrency_limit_by_name(name, limit)


@contextmanager
def training_slot(timeout_seconds: float | None = 3600) -> Iterator[None]:
    """Hold the device slot while training."""
    with concurrency(TRAINING_SLOT, occupy=1, timeout_seconds=timeout_seconds, strict=True):
        yield


@contextmanager
def promotion_slot(timeout_seconds: float | None = 300) -> Iterator[None]:
    """Hold the promotion slot across the read-compare-set of the champion alias."""
    with concurrency(PROMOTION_SLOT, occupy=1, timeout_seconds=timeout_seconds, strict=True):
        yield
