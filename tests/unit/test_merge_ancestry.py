"""`tasks.merge.common_ancestor` on a registry of tags: a TIES/DARE merge of versions without a
common registered ancestor is refused as a usage error (exit 2), not an unexpected one (70)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from evergreen.errors import ExitCode, UsageError, classify
from tasks.merge import common_ancestor


class _Registry:
    def __init__(self, tags: dict[str, dict[str, str]]) -> None:
        self.tags = tags

    def get_version(self, version: str) -> SimpleNamespace:
        return SimpleNamespace(tags=self.tags[version])


REGISTRY = _Registry(
    {
        "1": {"evergreen.cadence": "bootstrap", "evergreen.parent_version": "none"},
        "2": {"evergreen.cadence": "daily-lora", "evergreen.parent_version": "1"},
        "3": {"evergreen.cadence": "weekly-replay", "evergreen.parent_version": "1"},
    }
)


def test_siblings_share_their_parent() -> None:
    assert common_ancestor(REGISTRY, ["2", "3"]) == "1"  # type: ignore[arg-type]


def test_no_common_ancestor_is_a_usage_error() -> None:
    with pytest.raises(UsageError) as info:
        common_ancestor(REGISTRY, ["1", "2"])  # type: ignore[arg-type]
    failure = classify(info.value)
    assert failure.code == ExitCode.USAGE
    assert "share no registered ancestor" in failure.message
    assert "--method fisher or linear" in failure.message
