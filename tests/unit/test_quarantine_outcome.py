"""A run whose every batch was quarantined names the champion that stays, like every outcome."""

from __future__ import annotations

from evergreen.config import load_config
from flows import common
from model_registry.registry import Registry
from tasks.validate import PreparedData
from tests.digits_pipeline import digits_frame, write_batch, write_config


def test_all_quarantined_names_the_champion_that_stays(tmp_path, monkeypatch):
    landing = tmp_path / "landing"
    write_batch(landing, "2026-01-01", digits_frame(slice(0, 20)))
    cfg = load_config(write_config(tmp_path, landing, tmp_path / "home"))
    data = PreparedData(batch_ids=[], quarantined={"2026-01-01": "why"})

    before = common.all_quarantined(cfg, "daily-lora", data)  # an empty registry
    assert before.decision == "quarantined" and before.champion is None

    monkeypatch.setattr(Registry, "aliases", lambda self: {"champion": "5", "challenger": "6"})
    after = common.all_quarantined(cfg, "daily-lora", data).to_dict()
    assert after["champion"] == "5" and after["version"] is None
    assert after["quarantined"] == {"2026-01-01": "why"}
