"""The chunked integrity scan reaches the verdict of the Great Expectations suite on the whole frame.

Each case writes one batch to a local landing zone, validates it the product's way (`read_batch`
then `validate_batch`, GX on the whole frame) and with `scan_integrity` in chunks of 7 rows
(so every defect sits in some chunk and the duplicates span chunks), and compares the blocking
failures: expectation, column and count.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_plane.gx_suite import ensure_suite
from data_plane.integrity import scan_integrity
from data_plane.landing import LocalLandingZone, read_batch, write_frame
from data_plane.validation import validate_batch
from evergreen.config import DataConfig

FEATURES = [f"f{i}" for i in range(4)]


def _config(**overrides: object) -> DataConfig:
    fields = {"features": FEATURES, "label": "label", "classes": [0, 1, 2], **overrides}
    return DataConfig(**fields)  # type: ignore[arg-type]


def _clean(rows: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.standard_normal((rows, len(FEATURES))), columns=FEATURES)
    frame["label"] = rng.integers(0, 3, rows)
    return frame


def _nan(frame: pd.DataFrame) -> pd.DataFrame:
    frame.loc[[3, 40], "f1"] = np.nan
    return frame


def _inf(frame: pd.DataFrame) -> pd.DataFrame:
    frame.loc[[5], "f2"] = np.inf
    frame.loc[[50], "f0"] = -np.inf
    return frame


def _unknown_label(frame: pd.DataFrame) -> pd.DataFrame:
    frame.loc[[8, 9, 30], "label"] = 7
    return frame


def _text(frame: pd.DataFrame) -> pd.DataFrame:
    frame["f3"] = frame["f3"].astype(object)
    frame.loc[[20, 21], "f3"] = "abc"
    return frame


def _duplicates(frame: pd.DataFrame) -> pd.DataFrame:
    frame.iloc[30:60] = frame.iloc[0:30].to_numpy()  # half the rows: beyond the 20 % tolerated
    return frame


def _bounds(frame: pd.DataFrame) -> pd.DataFrame:
    frame.loc[[1, 2], "f0"] = 9.5
    return frame


def _extra(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(unlisted=1.0)


def _missing(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=["f2"])


CASES = {
    "clean": (lambda f: f, "parquet"),
    "clean csv": (lambda f: f, "csv"),
    "NaN": (_nan, "parquet"),
    "inf": (_inf, "parquet"),
    "inf csv": (_inf, "csv"),
    "unknown label": (_unknown_label, "parquet"),
    "text in a numeric column (csv)": (_text, "csv"),
    "duplicates": (_duplicates, "parquet"),
    "declared bounds": (_bounds, "parquet"),
    "extra column": (_extra, "parquet"),
    "missing column": (_missing, "parquet"),
    "NaN + unknown label (jsonl)": (lambda f: _unknown_label(_nan(f)), "jsonl"),
}


def _blocking(failures: list) -> set[tuple[str, str | None, int | None]]:
    return {
        (f.expectation, f.column, f.unexpected_count) for f in failures if f.severity == "critical"
    }


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_scan_matches_whole_frame_suite(tmp_path: Path, case: str) -> None:
    corrupt, fmt = CASES[case]
    cfg = _config(feature_bounds={"f0": (-9.0, 9.0)})
    zone = LocalLandingZone(tmp_path / "landing")
    write_frame(zone, "b", corrupt(_clean()), fmt=fmt)
    whole = validate_batch(read_batch(zone, "b", cfg), "b", cfg, ensure_suite(tmp_path, cfg))

    chunked = scan_integrity(zone, "b", cfg, chunk_rows=7)

    assert _blocking(chunked) == _blocking(whole.failures)
    assert (not chunked) == whole.success
    assert whole.success == case.startswith("clean")


def test_duplicates_across_files_and_dtypes(tmp_path: Path) -> None:
    """Copies in another file, with the label as float there, still count as copies."""
    cfg = _config()
    zone = LocalLandingZone(tmp_path / "landing")
    frame = _clean(40)
    write_frame(zone, "b", frame, fmt="parquet")
    write_frame(zone, "b", frame.iloc[:20], fmt="csv")
    whole = validate_batch(read_batch(zone, "b", cfg), "b", cfg, ensure_suite(tmp_path, cfg))

    chunked = scan_integrity(zone, "b", cfg, chunk_rows=16)

    assert _blocking(chunked) == _blocking(whole.failures)
    assert ("expect_compound_columns_to_be_unique", None, 40) in _blocking(chunked)


def test_text_configs_are_left_to_validate_batch(tmp_path: Path) -> None:
    cfg = DataConfig(text="text", label="label", classes=[0, 1])
    with pytest.raises(ValueError, match="validate_batch"):
        scan_integrity(LocalLandingZone(tmp_path), "b", cfg)
