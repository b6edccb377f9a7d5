"""Global concurrency limits on a real Prefect server: created once, never overwritten,
namespaced per pipeline, and released after use."""

from __future__ import annotations

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.settings import PREFECT_API_URL, temporary_settings

from tasks.limits import (
    ensure_limits,
    promotion_limit,
    promotion_slot,
    training_limit,
    training_slot,
)
from tests.integration.servers import prefect_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    with (
        prefect_server(tmp_path_factory.mktemp("prefect-limits")) as url,
        temporary_settings(updates={PREFECT_API_URL: url}),
    ):
        yield url


def read(name: str):
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name)


def test_limits_are_created_once_and_an_operator_value_is_kept(api):
    assert ensure_limits("fraud") == [training_limit("fraud"), promotion_limit("fraud")]
    with get_client(sync_client=True) as client:  # the operator raises the training limit
        client.update_global_concurrency_limit(
            training_limit("fraud"), GlobalConcurrencyLimitUpdate(limit=3)
        )
    assert ensure_limits("fraud") == []  # the next flow start or `evergreen deploy`
    assert read(training_limit("fraud")).limit == 3
    assert read(promotion_limit("fraud")).limit == 1


def test_two_pipelines_do_not_share_slots_and_slots_are_released(api, tmp_path):
    ensure_limits("churn")
    ensure_limits("spam")
    with promotion_slot("churn", timeout_seconds=30), promotion_slot("spam", timeout_seconds=30):
        assert read(promotion_limit("churn")).active_slots == 1
        assert read(promotion_limit("spam")).active_slots == 1
    with training_slot("churn", tmp_path, timeout_seconds=30):
        assert read(training_limit("churn")).active_slots == 1
    for name in (promotion_limit("churn"), promotion_limit("spam"), training_limit("churn")):
        assert read(name).active_slots == 0, f"{name} leaked a slot"
