"""What a run says or refuses before it trains: the champion that stays when every batch is
quarantined, a config that left the champion's classes or inputs, a merge of an unknown version."""

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
    report = cfg.home_path / "reports" / "validation" / "daily-lora" / "2026-01-01.md"
    assert f"see {report}, fix the files" in after["reasons"][0]  # the file, not a placeholder


def test_a_config_whose_classes_or_features_left_the_champions_is_a_config_error(tmp_path):
    """Adding a class (or renaming a feature) after bootstrap used to accept the batch, commit
    its rows to the data memory and fail that run and every later one with exit 70."""
    from types import SimpleNamespace

    import pytest

    from evergreen.errors import ConfigError, ExitCode, classify

    landing = tmp_path / "landing"
    write_batch(landing, "2026-01-01", digits_frame(slice(0, 20)))
    cfg = load_config(write_config(tmp_path, landing, tmp_path / "home"))
    spec = SimpleNamespace(
        family="mlp", classes=list(cfg.data.classes), feature_columns=list(cfg.data.features)
    )
    champion = SimpleNamespace(spec=spec, version="1")
    same = common.require_champion(champion, "daily-lora", cfg)  # order does not matter either
    assert same is champion
    spec.feature_columns = list(reversed(cfg.data.features))
    common.check_matches_champion(cfg, champion)

    spec.classes = list(cfg.data.classes)[:-1]
    with pytest.raises(ConfigError, match=r"does not match champion v1: data.classes") as info:
        common.require_champion(champion, "daily-lora", cfg)
    assert "evergreen run bootstrap" in str(info.value)
    assert classify(info.value).code == ExitCode.CONFIG
    spec.classes = list(cfg.data.classes)
    spec.feature_columns = ["renamed", *cfg.data.features[1:]]
    with pytest.raises(ConfigError, match=r"data.features \["):
        common.check_matches_champion(cfg, champion)

    spec.feature_columns = []  # a version saved before column names were recorded: by position
    common.check_matches_champion(cfg, champion)
    spec.family, spec.classes = "hf-causal-lm", []  # no classes: the config's is a placeholder
    common.check_matches_champion(cfg, champion)


def test_merge_of_a_version_that_does_not_exist_is_a_usage_error(tmp_path):
    """`run merge --versions 1 99`: exit 2 at once (it was exit 5 after the download's retries)."""
    import pytest

    from evergreen.errors import ExitCode, classify
    from model_registry.registry import UnknownVersionError
    from tasks.merge import require_versions

    landing = tmp_path / "landing"
    write_batch(landing, "2026-01-01", digits_frame(slice(0, 20)))
    cfg = load_config(write_config(tmp_path, landing, tmp_path / "home"))
    with pytest.raises(UnknownVersionError, match=r"--versions: .*no version '99'") as info:
        require_versions(cfg, ["99"])
    assert classify(info.value).code == ExitCode.USAGE


def test_a_text_config_whose_max_length_left_the_champions_is_a_config_error(tmp_path):
    """`model.max_length` is the width of a text champion's inputs and of the token ids the
    replay buffer stores: a changed one failed the run with 'unexpected ValueError: X must be
    [N, 128], got [82, 64]' (exit 70) after committing the batch's rows to the memory."""
    from types import SimpleNamespace

    import pytest

    from evergreen.config import config_from_dict
    from evergreen.errors import ConfigError, ExitCode, classify

    (tmp_path / "landing").mkdir()
    tree = {
        "home": str(tmp_path / "home"),
        "data": {"landing": str(tmp_path / "landing"), "text": "text", "classes": ["a", "b"]},
        "model": {"family": "hf", "hf_path": str(tmp_path), "max_length": 128},
    }
    spec = SimpleNamespace(
        family="hf", classes=["a", "b"], feature_columns=["text"], n_features=128
    )
    champion = SimpleNamespace(spec=spec, version="4")
    common.check_matches_champion(config_from_dict(tree), champion)
    with pytest.raises(
        ConfigError, match=r"champion v4: model.max_length 64 \(champion: 128\)"
    ) as info:
        common.check_matches_champion(config_from_dict(tree, ["model.max_length=64"]), champion)
    assert classify(info.value).code == ExitCode.CONFIG
