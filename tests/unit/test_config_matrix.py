"""Every configuration value is validated: a matrix of bad configs, each refused with a message
that names the key and says what was expected (the file is never half-applied)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from evergreen.config import config_from_dict

MINIMAL = {"data": {"features": ["a", "b"], "label": "y", "classes": [0, 1]}}

BAD = {
    "unknown-key": ("data.clases=[0, 1]", "clases"),
    "unknown-section": ("dayly.lora_r=8", "dayly"),
    "one-class": ("data.classes=[1]", "at least two classes"),
    "duplicate-classes": ("data.classes=[1, 1, 2]", "duplicates"),
    "no-features-no-text": ("data.features=[]", "set `features`"),
    "duplicate-feature": ("data.features=[a, a]", "more than once"),
    "label-is-a-feature": ("data.label=a", "also a feature"),
    "fractions-too-large": ("data.gate_fraction=0.85", "below 0.9"),
    "fraction-out-of-range": ("data.select_fraction=1.5", "select_fraction"),
    "bounds-unknown-column": ("data.feature_bounds={z: [0, 1]}", "not in data.features"),
    "bounds-inverted": ("data.feature_bounds={a: [5, 1]}", "min < max"),
    "landing-bad-scheme": ("data.landing=ftp://host/x", "unsupported scheme"),
    "landing-no-bucket": ("data.landing=s3:///prefix", "no bucket"),
    "landing-empty": ("data.landing=''", "data.landing is empty"),
    "gx-store-local-path": ("data.gx_store=/shared/gx", "expected s3://bucket/prefix"),
    "gx-store-no-bucket": ("data.gx_store=s3:///gx", "data.gx_store"),
    "quiescence-negative": ("data.arrival_quiescence_seconds=-1", "arrival_quiescence_seconds"),
    "extra-columns-policy": ("data.extra_columns=drop", "extra_columns"),
    "change-unknown-check": ("data.change.block=[colour]", "block"),
    "family-unknown": ("model.family=resnet", "expected one of"),
    "hf-without-path": ("model.family=hf", "needs model.hf_path"),
    "heads-do-not-divide": ("model={family: transformer, d_model: 30, n_heads: 4}", "divisible"),
    "hidden-zero": ("model.hidden=[64, 0]", "sizes must be >= 1"),
    "dropout-one": ("model.dropout=1.0", "dropout"),
    "registry-name-quote": ('registry.name="it\'s"', "registry.name"),
    "registry-name-slash": ("registry.name=team/model", "registry.name"),
    "experiment-space": ("registry.experiment='my exp'", "registry.experiment"),
    "lr-zero": ("weekly.train.lr=0", "lr"),
    "lr-nan": ("weekly.train.lr=.nan", "lr"),
    "steps-inf": ("monthly.train.epochs=.inf", "epochs"),
    "batch-size-text": ("daily.train.batch_size=big", "batch_size"),
    "lora-rank-negative": ("daily.lora_r=-1", "lora_r"),
    "targets-empty": ("daily.target_modules=[]", "target_modules"),
    "replay-ratio-one": ("weekly.replay_ratio=1", "replay_ratio"),
    "replay-leaves-no-new-row": ("weekly.train.batch_size=2", "weekly: replay_ratio 0.75"),
    "ewc-lambda-negative": ("monthly.ewc_lambda=-3", "ewc_lambda"),
    "ewc-lambda-word": ("monthly.ewc_lambda=high", "ewc_lambda"),
    "lambda-grid-empty": ("weekly.lambda_grid=[]", "lambda_grid"),
    "step-grid-empty": ("weekly.step_grid=[]", "step_grid"),
    "step-grid-zero": ("monthly.step_grid=[0,1]", "step_grid"),
    "fisher-decay": ("weekly.fisher_decay=1.5", "fisher_decay"),
    "ema-decay": ("stream.ema_decay=1", "ema_decay"),
    "ph-threshold-negative": ("stream.ph_threshold=-2", "ph_threshold"),
    "false-alarm-zero": ("stream.false_alarm_rate=0", "false_alarm_rate"),
    "consolidate-mode": ("consolidate.mode=average", "mode"),
    "lineage-one": ("consolidate.lineage=1", "lineage"),
    "confidence-half": ("gate.confidence=0.5", "confidence"),
    "tolerance-negative": ("gate.new_data_tolerance=-0.1", "new_data_tolerance"),
    "gate-rule": ("gate.new_data_rule=better", "new_data_rule"),
    "bootstrap-too-few": ("gate.n_bootstrap=10", "n_bootstrap"),
    "memory-capacity-zero": ("memory.replay_capacity=0", "replay_capacity"),
    "memory-policy": ("memory.replay_policy=fifo", "replay_policy"),
}


@pytest.mark.parametrize(("override", "message"), BAD.values(), ids=BAD.keys())
def test_a_bad_config_is_refused_with_a_message_naming_the_key(override, message):
    with pytest.raises((ValidationError, ValueError)) as info:
        config_from_dict(MINIMAL, [override])
    text = str(info.value)
    assert message in text, text
    assert "Traceback" not in text and len(text) < 2000  # one readable message, not a dump


def test_the_matrix_is_large_enough_and_the_minimal_config_is_valid():
    assert len(BAD) >= 20
    cfg = config_from_dict(MINIMAL)
    assert cfg.data.arrival_quiescence_seconds == 30
