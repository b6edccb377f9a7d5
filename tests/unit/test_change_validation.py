"""Validation semantics: change is accepted (with a warning), corruption is quarantined.

The suite and the accepted-data profile are built from one batch, then validated against data
they were not fitted on: later scans of real digits redrawn by new writers (rotated, shifted,
thicker, brighter), a new class mix, and the new-user scenario of the issue (64 features in
[0, 1], a first batch that does not span their range). The right answer for those is "accept";
units switched ×16, text in a numeric column, unknown labels and NaN must still be quarantined.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from sklearn.datasets import load_digits

from data_plane.gx_suite import ensure_suite
from data_plane.messages import CHANGE_LINE_COLUMNS, change_lines, clip_middle
from data_plane.profile import DataProfile, GrossChangeRule, gross_change
from data_plane.readers import BatchReadError
from data_plane.validation import validate_batch
from evergreen.config import DataConfig
from tasks.ingest import RawBatch
from tasks.validate import QUARANTINE_REASON_LIMIT, quarantine_reason, verdict_fingerprint

PIXELS = [f"pixel_{i}" for i in range(64)]


def _config(**overrides) -> DataConfig:
    fields = {"features": PIXELS, "label": "label", "classes": list(range(10)), **overrides}
    return DataConfig(**fields)


def _digits(rows: slice, transform=None) -> pd.DataFrame:
    digits = load_digits()
    images = digits.images[rows].astype(float)
    if transform is not None:
        images = np.stack([transform(image) for image in images])
    frame = pd.DataFrame(images.reshape(len(images), 64), columns=PIXELS)
    frame["label"] = digits.target[rows]
    return frame


def _accepted(frame: pd.DataFrame) -> DataProfile:
    return DataProfile().updated(frame, PIXELS, "label")


@pytest.fixture(scope="module")
def first_batch() -> pd.DataFrame:
    return _digits(slice(0, 400))


def _validate(tmp_path: Path, frame: pd.DataFrame, profile: DataProfile, cfg=None, reference=None):
    cfg = cfg or _config()
    suite = ensure_suite(tmp_path, cfg)
    return validate_batch(frame, "later", cfg, suite, profile=profile, reference=reference)


REAL_SHIFTS = {
    "rotated 30°": lambda im: ndimage.rotate(im, 30, reshape=False, order=1),
    "shifted 2 px": lambda im: ndimage.shift(im, (0, 2), order=0),
    "thicker strokes": lambda im: ndimage.grey_dilation(im, size=(2, 2)),
    "brighter (gain ×1.6, no clipping)": lambda im: im * 1.6,
}


@pytest.mark.parametrize("name", list(REAL_SHIFTS))
def test_genuine_shifts_of_real_digits_are_accepted_with_a_warning(tmp_path, first_batch, name):
    later = _digits(slice(400, 700), REAL_SHIFTS[name])
    report = _validate(tmp_path, later, _accepted(first_batch), reference=first_batch)
    assert report.success, report.summary()
    assert report.failures == []
    assert report.statistics["gross_change"]["displaced"] == {} or name.startswith("brighter")


def test_values_beyond_the_first_batch_are_accepted_and_reported(tmp_path, first_batch):
    brighter = _digits(slice(400, 700), REAL_SHIFTS["brighter (gain ×1.6, no clipping)"])
    report = _validate(tmp_path, brighter, _accepted(first_batch))
    assert report.success
    beyond = [w for w in report.warnings if w.expectation == "expect_column_values_to_be_between"]
    assert beyond, "values beyond the accepted range must be reported"
    assert all(w.severity == "warning" for w in beyond)
    assert "beyond the range accepted so far" in beyond[0].message
    assert "Changes (informational" in report.summary()


def test_range_changes_of_many_columns_log_as_one_line(tmp_path, first_batch):
    """Forty columns moving is one change to read in a flow's log, not forty lines; every
    column stays in the report, and other changes keep their own lines."""
    brighter = _digits(slice(400, 700), REAL_SHIFTS["brighter (gain ×1.6, no clipping)"])
    report = _validate(tmp_path, brighter, _accepted(first_batch))
    beyond = [w for w in report.warnings if "beyond the range accepted so far" in w.message]
    assert len(beyond) > CHANGE_LINE_COLUMNS
    lines = change_lines(report, "reports/later.md")
    assert len(lines) == len(report.warnings) - len(beyond) + 1
    head = lines[0]
    assert head.startswith(f"{len(beyond)} columns have values beyond the range accepted so far")
    most = max(beyond, key=lambda w: w.unexpected_count or 0)
    assert f"{most.column} ({(most.unexpected_count or 0) / report.n_rows:.1%})" in head
    assert f"… {len(beyond) - CHANGE_LINE_COLUMNS} more" in head
    assert "data.change.block" in head and head.endswith("reports/later.md")
    summary = report.summary()
    assert all(f"| {w.column} |" in summary for w in beyond)
    one = replace(report, warnings=beyond[:1])
    assert change_lines(one) == [beyond[0].message]


def test_the_new_users_64_columns_in_0_1(tmp_path):
    """The issue's scenario: a first batch that reaches 0.5 at most, later ones that go further."""
    rng = np.random.default_rng(0)
    features = [f"f{i}" for i in range(64)]
    cfg = DataConfig(features=features, label="label", classes=[0, 1, 2])
    first = pd.DataFrame(rng.uniform(0, 0.5, size=(300, 64)), columns=features)
    first["label"] = rng.integers(0, 3, 300)
    later = pd.DataFrame(rng.uniform(0, 1.0, size=(300, 64)), columns=features)
    later["label"] = rng.integers(0, 3, 300)
    suite = ensure_suite(tmp_path, cfg)
    report = validate_batch(
        later, "b2", cfg, suite, profile=DataProfile().updated(first, features, "label")
    )
    assert report.success, report.summary()
    assert len(report.warnings) >= 1


def test_a_class_the_first_batch_did_not_contain_is_accepted(tmp_path):
    digits = load_digits()
    rows = np.flatnonzero(digits.target < 5)[:300]
    first = _digits(slice(None))[lambda f: f.index.isin(rows)].reset_index(drop=True)
    new_classes = _digits(slice(None))[lambda f: f["label"] >= 5].head(200).reset_index(drop=True)
    report = _validate(tmp_path, new_classes, _accepted(first))
    assert report.success, report.summary()
    mix = [w for w in report.warnings if w.expectation == "class_mix"]
    assert mix and "classes never accepted before: ['5', '6', '7', '8', '9']" in mix[0].message
    blocking = _config(change={"block": ["class_mix"]})
    assert not _validate(tmp_path / "b", new_classes, _accepted(first), cfg=blocking).success


def test_units_switched_x16_is_quarantined(tmp_path, first_batch):
    scaled = _digits(slice(400, 700), lambda im: im * 16)
    report = _validate(tmp_path, scaled, _accepted(first_batch))
    assert not report.success
    [failure] = [f for f in report.failures if f.expectation == "gross_change"]
    assert "switching units" in failure.message and "--force" in failure.message
    relaxed = _config(change={"gross_change": False})
    assert _validate(tmp_path / "relaxed", scaled, _accepted(first_batch), cfg=relaxed).success


def test_the_quarantine_reason_keeps_the_command_that_accepts_the_batch(tmp_path, first_batch):
    """The ledger's reason is clipped in the middle: its end says what to do (here the command
    that accepts a real jump once) and where the report is; a head-only cut dropped both."""
    scaled = _digits(slice(400, 700), lambda im: im * 16)
    report = _validate(tmp_path, scaled, _accepted(first_batch))
    reason = quarantine_reason(report, tmp_path / "report.md")
    assert "--force --set data.change.gross_change=false" in reason
    assert reason.endswith(f"(report {tmp_path / 'report.md'})")
    assert len(reason) <= QUARANTINE_REASON_LIMIT


def test_clip_middle_keeps_both_ends():
    text = "head " + "x" * 500 + " tail"
    clipped = clip_middle(text, 60)
    assert len(clipped) == 60 and clipped.startswith("head ") and clipped.endswith(" tail")
    assert clip_middle("short", 60) == "short"


@pytest.mark.parametrize(
    ("name", "breakage", "needle"),
    [
        (
            "text in a numeric column",
            lambda f: f.astype({"pixel_20": object}).assign(pixel_20="n/a"),
            "must be numeric",
        ),
        ("unknown labels", lambda f: f.assign(label=11), "labels not in data.classes"),
        ("NaN", lambda f: f.assign(pixel_30=np.nan), "missing values"),
    ],
)
def test_corruption_is_quarantined_even_after_change_was_accepted(
    tmp_path, first_batch, name, breakage, needle
):
    later = breakage(_digits(slice(400, 700), REAL_SHIFTS["rotated 30°"]))
    report = _validate(tmp_path, later, _accepted(first_batch))
    assert not report.success, name
    assert any(needle in f.message for f in report.failures), report.summary()


def test_opt_in_range_blocking_uses_mostly(tmp_path, first_batch):
    cfg = _config(change={"block": ["range"], "range_mostly": 0.99})
    profile = _accepted(first_batch)
    one_extreme = first_batch.copy()
    one_extreme.loc[3, "pixel_10"] = 40.0  # one value of 400 beyond the range: within mostly
    assert _validate(tmp_path, one_extreme, profile, cfg=cfg).success
    many = _digits(slice(400, 700), lambda im: im * 1.6)
    report = _validate(tmp_path / "many", many, profile, cfg=cfg)
    assert not report.success
    assert all(f.severity == "critical" for f in report.failures)


def test_unknown_labels_are_counted_over_the_batch_not_over_gx_samples(tmp_path, first_batch):
    """GX keeps a sample of the unexpected values: 'x ×7, y ×3' on 85 bad rows read as totals."""
    later = _digits(slice(400, 700))
    later["label"] = later["label"].astype(object)
    later.loc[:239, "label"] = "eleven"
    later.loc[240:, "label"] = "twelve"
    report = _validate(tmp_path, later, _accepted(first_batch))
    [failure] = [f for f in report.failures if "labels not in" in f.message]
    assert "300 rows with labels not in data.classes" in failure.message
    assert "'eleven' ×240, 'twelve' ×60" in failure.message, failure.message


def test_a_batch_landed_twice_under_another_id_is_quarantined(tmp_path, first_batch):
    """An exact re-export of an accepted batch (same rows, any order, any column order) under a
    new batch_id adds no information and would train its rows twice: it is quarantined naming
    the batch it repeats. The same batch revalidated (another cadence, --force) still passes."""
    cfg = _config()
    suite = ensure_suite(tmp_path, cfg)
    profile = DataProfile().updated(first_batch, PIXELS, "label", batch_id="2026-01-02")
    again = first_batch.sample(frac=1.0, random_state=1)[["label", *PIXELS[::-1]]]
    report = validate_batch(again, "2026-01-02-reexport", cfg, suite, profile=profile)
    assert not report.success
    [failure] = report.failures
    assert "the same rows as batch '2026-01-02'" in failure.message, failure.message
    assert validate_batch(first_batch, "2026-01-02", cfg, suite, profile=profile).success
    one_row_more = pd.concat([first_batch, _digits(slice(400, 401))], ignore_index=True)
    assert validate_batch(one_row_more, "other", cfg, suite, profile=profile).success
    assert DataProfile.from_json(profile.to_json()) == profile
    legacy = '{"ranges": {}, "class_counts": {}, "batches": 1, "rows": 3}'
    assert DataProfile.from_json(legacy).digests == {}


def test_inferred_ranges_widen_as_data_is_accepted(first_batch):
    brighter = _digits(slice(400, 700), lambda im: im * 1.6)
    profile = _accepted(first_batch)
    wider = profile.updated(brighter, PIXELS, "label")
    assert wider.batches == 2 and wider.rows == 700
    assert all(wider.ranges[p].high >= profile.ranges[p].high for p in PIXELS)
    assert max(wider.ranges[p].high for p in PIXELS) > 16
    assert profile.batches == 1  # `updated` returns a new profile
    assert DataProfile.from_json(wider.to_json()) == wider


def test_gross_rule_both_sides_on_digits(first_batch):
    """×16 and +273 displace most features; rotations, shifts, gains and permutations none."""
    profile = _accepted(first_batch)
    later = _digits(slice(400, 800))
    cases = {
        "×16": (later[PIXELS] * 16, True),
        "+273": (later[PIXELS] + 273, True),
        "×2": (later[PIXELS] * 2, False),
        "permuted": (
            later[PIXELS].sample(frac=1.0, axis=1, random_state=0).set_axis(PIXELS, axis=1),
            False,
        ),
        "one column ×100": (later[PIXELS].assign(pixel_36=later["pixel_36"] * 100), False),
    }
    for name, (frame, broken) in cases.items():
        verdict = gross_change(frame, profile, PIXELS, GrossChangeRule())
        assert verdict.broken is broken, (name, len(verdict.displaced))


def test_the_verdict_fingerprint_changes_with_the_content_the_suite_and_the_config(tmp_path):
    cfg = _config()
    suite = ensure_suite(tmp_path, cfg)
    frame = _digits(slice(0, 50)).astype({"pixel_3": object})
    frame.loc[4, "pixel_3"] = "#VALUE!"
    key = verdict_fingerprint(RawBatch("b", frame), suite, cfg)
    assert verdict_fingerprint(RawBatch("b", frame.copy()), suite, cfg) == key
    fixed = frame.copy()
    fixed.loc[4, "pixel_3"] = 0.0
    assert verdict_fingerprint(RawBatch("b", fixed), suite, cfg) != key  # fixed in place
    assert verdict_fingerprint(RawBatch("b", frame), suite, _config(min_rows=5)) != key
    suite.write_text(suite.read_text().replace('"critical"', '"warning"', 1))
    assert verdict_fingerprint(RawBatch("b", frame), suite, cfg) != key  # the suite was edited
    unreadable = RawBatch("b", None, BatchReadError("b", "part-0.csv", "not UTF-8"))
    other = RawBatch("b", None, BatchReadError("b", "part-0.csv", "truncated"))
    assert verdict_fingerprint(unreadable, suite, cfg) != verdict_fingerprint(other, suite, cfg)
