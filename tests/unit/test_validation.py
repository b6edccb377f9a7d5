"""Validation: a matrix of corrupt batches, each failing with a message that names the problem.

The `test_zone_*` functions also run against S3 (tests/integration/test_s3_landing.py).
"""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pandas as pd
import pytest

from data_plane.gx_suite import (
    NUMERIC_TYPES,
    build_suite,
    ensure_suite,
    load_suite,
    suite_path,
    write_suite,
)
from data_plane.landing import LandingZone, open_landing, write_frame
from data_plane.messages import Failure, ValidationReport
from data_plane.validation import read_and_validate, save_report, validate_batch
from tests.fixtures_data import make_batch, make_config, snapshot


@pytest.fixture
def zone(tmp_path) -> LandingZone:
    return open_landing(str(tmp_path / "landing"))


def _suite_for_tests(home: Path) -> Path:
    """The integrity suite the flows write on first use."""
    return ensure_suite(home, make_config())


def _parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _with(frame: pd.DataFrame, column: str, rows: list[int], value: object) -> pd.DataFrame:
    frame = frame.copy()
    if not isinstance(value, float | int):
        frame[column] = frame[column].astype(object)
    frame.loc[rows, column] = value
    return frame


def _non_utf8_csv(frame: pd.DataFrame) -> bytes:
    text = frame.assign(note="ok").to_csv(index=False)
    return text.replace("ok", "caf\u00e9", 1).encode("latin-1")


# name -> (write the batch, substrings the failure message must contain)
Writer = Callable[[LandingZone, str, pd.DataFrame], None]
CORRUPT: dict[str, tuple[Writer, list[str]]] = {
    "missing column": (
        lambda z, b, f: write_frame(z, b, f.drop(columns=["f1"])),
        ["column 'f1' is missing", "or data.features in the config"],
    ),
    "regression target as label": (
        lambda z, b, f: write_frame(z, b, f.assign(label=np.linspace(25.0, 346.0, len(f)))),
        ["60 distinct numeric values", "continuous target", "evergreen trains classifiers"],
    ),
    "strings in numeric feature": (
        lambda z, b, f: write_frame(z, b, _with(f, "f2", [5, 9], "abc"), fmt="csv"),
        ["column 'f2' must be numeric", "2 values are not numbers", "'abc'", "part-00000.csv"],
    ),
    "NaN": (
        lambda z, b, f: write_frame(z, b, _with(f, "f0", [1, 2, 3], np.nan)),
        ["column 'f0' has 3 missing values"],
    ),
    "inf": (
        lambda z, b, f: write_frame(z, b, _with(f, "f3", [4, 8], np.inf), fmt="csv"),
        ["column 'f3' has 2 non-finite values (±inf)", "part-00000.csv"],
    ),
    "unknown label": (
        lambda z, b, f: write_frame(z, b, _with(f, "label", [0, 1, 2, 3], 7)),
        ["4 rows with labels not in data.classes [0, 1, 2]", "7 ×4", "a new class needs a new"],
    ),
    "empty file": (
        lambda z, b, f: (write_frame(z, b, f), z.write_bytes(b, "b.csv", b"")),
        ["file 'b.csv'", "the file is empty"],
    ),
    "truncated parquet": (
        lambda z, b, f: z.write_bytes(b, "a.parquet", _parquet(f)[:300]),
        ["file 'a.parquet'", "truncated or corrupt"],
    ),
    "duplicates beyond tolerance": (
        lambda z, b, f: write_frame(z, b, pd.concat([f[:30], f[:15]], ignore_index=True)),
        ["30 rows (66.7%) are exact duplicates", "15 repeat an earlier row", "at most 20.0%"],
    ),
    "extra column": (
        lambda z, b, f: write_frame(z, b, f.assign(customer_id=range(len(f)))),
        ["columns the config does not list: ['customer_id']", "data.extra_columns: ignore"],
    ),
    "mixed schemas (columns)": (
        lambda z, b, f: (
            z.write_bytes(b, "a.parquet", _parquet(f[:30])),
            z.write_bytes(b, "b.parquet", _parquet(f[30:].assign(extra=1))),
        ),
        ["mixed schemas", "'a.parquet'", "'b.parquet'", "['extra']"],
    ),
    "mixed schemas (types)": (
        lambda z, b, f: (
            z.write_bytes(b, "a.csv", f[:30].to_csv(index=False).encode()),
            z.write_bytes(b, "b.csv", f[30:].assign(f2="x").to_csv(index=False).encode()),
        ),
        ["mixed schemas", "'f2': numeric vs string", "'a.csv'", "'b.csv'"],
    ),
    "non-UTF-8 CSV": (
        lambda z, b, f: z.write_bytes(b, "latin1.csv", _non_utf8_csv(f)),
        ["file 'latin1.csv'", "not valid UTF-8", "0xe9", "re-export it as UTF-8"],
    ),
    "too few rows": (
        lambda z, b, f: write_frame(z, b, f[:5]),
        ["the batch has 5 rows; expected between 20 and"],
    ),
    "unparseable JSONL": (
        lambda z, b, f: z.write_bytes(b, "rows.jsonl", b'{"f0": 1}\n{"f0": 2}\n{"f0": 3,\n'),
        ["file 'rows.jsonl'", "line 3 is not valid JSON"],
    ),
    "no data files": (
        lambda z, b, f: z.write_bytes(b, "readme.txt", b"see the wiki"),
        ["no .parquet/.csv/.jsonl/.json files"],
    ),
    "semicolon-separated CSV": (
        lambda z, b, f: z.write_bytes(b, "eu.csv", f.to_csv(index=False, sep=";").encode()),
        ["file 'eu.csv'", "looks ';'-separated", "must be comma-separated"],
    ),
    "header-only CSV": (
        lambda z, b, f: z.write_bytes(b, "a.csv", b"f0,f1,f2,f3,label\n"),
        ["file 'a.csv'", "holds no rows"],
    ),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_zone_corrupt_batch_fails_with_a_specific_message(
    zone: LandingZone, tmp_path: Path, case: str
) -> None:
    write, expected = CORRUPT[case]
    suite_file = _suite_for_tests(tmp_path / "home")
    write(zone, "2026-11-21", make_batch(60, seed=7))
    before = snapshot(zone)
    frame, report = read_and_validate(zone, "2026-11-21", make_config(), suite_file)
    assert not report.success
    messages = [f.message for f in report.failures]
    assert len(messages) == 1, messages  # one cause, reported once (no follow-on noise)
    for needle in expected:
        assert needle in messages[0], (case, needle, messages[0])
    assert (frame is None) == (report.failures[0].expectation == "read_batch")
    assert snapshot(zone) == before  # nothing in the landing zone was modified or deleted
    assert "2026-11-21" in report.headline() and "INVALID" in report.headline()


def test_zone_valid_batch_in_three_formats_passes(zone: LandingZone, tmp_path: Path) -> None:
    suite_file = _suite_for_tests(tmp_path / "home")
    frame = make_batch(90, seed=11)
    write_frame(zone, "2026-11-22", frame[:30], fmt="parquet")
    write_frame(zone, "2026-11-22", frame[30:60], fmt="csv")
    write_frame(zone, "2026-11-22", frame[60:], fmt="jsonl")
    read, report = read_and_validate(zone, "2026-11-22", make_config(), suite_file)
    assert report.success, report.summary()
    assert read is not None and report.n_rows == 90 and report.failures == []
    assert report.statistics["rows_per_file"] == {
        "part-00000.parquet": 30,
        "part-00001.csv": 30,
        "part-00002.jsonl": 30,
    }


def test_labels_that_name_a_class_in_another_type_are_read_as_that_class(
    zone: LandingZone, tmp_path: Path
) -> None:
    """JSON producers quote numbers ("2") and Parquet has boolean targets: "2" was quarantined
    as 'not in data.classes [0, 1, 2]' although training maps it to class 2, and True passed
    validation (True == 1) and then failed training ('True' is not a class, exit 70)."""
    from tasks.common import encode_labels

    suite_file = _suite_for_tests(tmp_path / "home")
    frame = make_batch(60, seed=12)
    write_frame(zone, "quoted", frame.assign(label=frame["label"].astype(str)), fmt="jsonl")
    read, report = read_and_validate(zone, "quoted", make_config(), suite_file)
    assert report.success, report.summary()
    assert read is not None and read["label"].tolist() == frame["label"].tolist()
    binary = make_config(classes=[0, 1])
    flags = frame.assign(label=frame["label"] == 1)
    write_frame(zone, "flags", flags, fmt="parquet")
    read, report = read_and_validate(zone, "flags", binary, ensure_suite(tmp_path / "b", binary))
    assert report.success, report.summary()
    assert read is not None
    assert encode_labels(read["label"], [0, 1]).tolist() == flags["label"].astype(int).tolist()
    write_frame(zone, "unknown", frame.assign(label="7"), fmt="jsonl")
    _, report = read_and_validate(zone, "unknown", make_config(), suite_file)
    assert not report.success and "'7' ×60" in report.failures[0].message


def test_labels_already_of_their_classes_are_not_rebuilt() -> None:
    """An int64 label column (every Parquet or CSV batch of integer classes) was rebuilt as an
    object array and re-inferred on every read: np.int64(2) is not of type int. It comes back
    as it is; the labels named in another type are mapped as before."""
    from data_plane.profile import canonical_labels

    classes = [0, 1, 2]
    ints = pd.Series(np.array([2, 0, 1, 2], dtype=np.int64), name="label")
    assert canonical_labels(ints, classes) is ints and ints.dtype == np.int64
    texts = pd.Series(["b", "a", None], dtype=object)
    assert canonical_labels(texts, ["a", "b"]) is texts
    for given, expected in [
        (["2", "0", "1"], [2, 0, 1]),  # quoted by a JSON producer
        ([2.0, 0.0, 1.0], [2, 0, 1]),  # a float column
        ([True, False, True], [1, 0, 1]),  # a boolean target for classes [0, 1]
        ([np.True_, np.False_], [1, 0]),
    ]:
        labels = pd.Series(given)
        out = canonical_labels(labels, classes)
        assert out is not labels and out.tolist() == expected, (given, out.tolist())
        assert out.dtype == np.int64, (given, out.dtype)
    flags = pd.Series([np.True_, np.False_])  # classes that are booleans: kept exactly as now
    assert canonical_labels(flags, [True, False]).tolist() == [True, False]


def test_suite_file_is_reviewable_and_user_edits_are_honoured(zone, tmp_path: Path) -> None:
    home = tmp_path / "home"
    path = _suite_for_tests(home)
    assert path == suite_path(home) == home / "gx" / "expectations" / "evergreen-batch.json"
    data = json.loads(path.read_text())
    kinds = {e["type"] for e in data["expectations"]}
    assert {
        "expect_table_columns_to_match_set",
        "expect_multicolumn_values_to_be_finite_numbers",
    } <= kinds
    batch = make_batch(60, seed=7)
    assert validate_batch(batch, "b", make_config(), path).success
    data["expectations"].append(  # the user bounds f1's range by hand
        {
            "type": "expect_column_values_to_be_between",
            "kwargs": {"column": "f1", "min_value": -0.1, "max_value": 0.1},
        }
    )
    path.write_text(json.dumps(data, indent=2))
    assert ensure_suite(home, make_config()) == path
    assert json.loads(path.read_text()) == data  # ensure_suite kept the user's file
    report = validate_batch(batch, "b", make_config(), path)
    assert [f.column for f in report.failures] == ["f1"]
    assert "outside [-0.1, 0.1]" in report.failures[0].message


def test_a_misnamed_label_column_says_which_config_key_to_set(tmp_path: Path) -> None:
    """The config's data.label is wrong, not the batch: the message names the key and the one
    column nothing in the config names."""
    batch = make_batch(60, seed=7).rename(columns={"label": "species"})
    report = validate_batch(batch, "b", make_config(), _suite_for_tests(tmp_path / "home"))
    first = report.failures[0].message
    assert first.startswith("column 'label' is missing")
    assert "set data.label to 'species' in the config" in first and "--force" in first


def test_an_unedited_suite_follows_the_data_config_an_edited_one_is_kept(tmp_path: Path) -> None:
    """A user who corrects `data.label` (or adds a class) after a first run is validated
    against the corrected config, not the suite the wrong one generated; a suite they edited
    by hand stays theirs."""
    home = tmp_path / "home"
    batch = make_batch(60, seed=7).rename(columns={"label": "species"})
    wrong = make_config(label="target")
    path = ensure_suite(home, wrong)
    report = validate_batch(batch, "b", wrong, path)
    assert "column 'target'" in report.failures[0].message
    right = make_config(label="species")
    assert ensure_suite(home, right) == path
    assert validate_batch(batch, "b", right, path).success
    assert ensure_suite(home, right) == path and validate_batch(batch, "b", right, path).success

    data = json.loads(path.read_text())  # the user's own edit: min_rows 20 → 50
    for item in data["expectations"]:
        if item["type"] == "expect_table_row_count_to_be_between":
            item["kwargs"]["min_value"] = 50
    path.write_text(json.dumps(data, indent=2))
    four = make_config(label="species", classes=[0, 1, 2, 3])
    ensure_suite(home, four)
    assert json.loads(path.read_text()) == data  # edited: kept as it is


def test_a_suite_in_the_old_form_still_validates_and_is_merged_in_place(
    zone: LandingZone, tmp_path: Path
) -> None:
    """Suites written before the table-level column check hold one `expect_column_to_exist` per
    column: they keep working, with the same verdicts and messages."""
    home = tmp_path / "home"
    path = _suite_for_tests(home)
    data = json.loads(path.read_text())
    table = [e for e in data["expectations"] if e["type"] == "expect_table_columns_to_match_set"]
    assert len(table) == 1
    columns = table[0]["kwargs"]["column_set"]
    data["expectations"] = [
        {"type": "expect_column_to_exist", "kwargs": {"column": c}} for c in columns
    ] + [e for e in data["expectations"] if e is not table[0]]
    path.write_text(json.dumps(data, indent=2))
    batch = make_batch(60, seed=7)
    assert validate_batch(batch, "b", make_config(), path).success
    report = validate_batch(batch.drop(columns=["f1"]), "b", make_config(), path)
    assert [(f.expectation, f.column) for f in report.failures] == [
        ("expect_column_to_exist", "f1")
    ]
    assert "column 'f1' is missing" in report.failures[0].message
    assert ensure_suite(home, make_config()) == path  # the plain checks become one, in place
    merged = json.loads(path.read_text())
    assert merged["expectations"][0]["type"] == "expect_table_columns_to_match_set"
    assert merged["expectations"][0]["kwargs"]["column_set"] == columns
    assert merged["expectations"][1:] == data["expectations"][len(columns) :]
    new_form = validate_batch(
        batch.drop(columns=["f1"]), "b", make_config(), _suite_for_tests(tmp_path / "other")
    )
    assert [f.message for f in new_form.failures] == [f.message for f in report.failures]


def _per_column_checks(column: str, meta: dict | None = None) -> list[dict]:
    """The three integrity checks per feature that suites held before the finite-numbers one."""
    finite = {"min_value": -sys.float_info.max, "max_value": sys.float_info.max}
    return [
        {
            "type": "expect_column_values_to_be_in_type_list",
            "kwargs": {"column": column, "type_list": NUMERIC_TYPES},
        },
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": column}},
        {
            "type": "expect_column_values_to_be_between",
            "kwargs": {"column": column, **finite},
            "meta": meta or {"bounds_from": "finite values only"},
        },
    ]


def test_a_suite_with_per_column_checks_keeps_its_verdicts_and_is_merged(tmp_path: Path) -> None:
    """Suites written before the finite-numbers check hold three checks per feature: they keep
    working; `ensure_suite` merges the untouched ones into one, with the same failures."""
    home = tmp_path / "home"
    path = _suite_for_tests(home)
    data = json.loads(path.read_text())
    kinds = [e["type"] for e in data["expectations"]]
    at = kinds.index("expect_multicolumn_values_to_be_finite_numbers")
    old = [c for f in ("f0", "f1", "f2") for c in _per_column_checks(f)]
    old += _per_column_checks("f3", {"bounds_from": "finite values only", "owner": "me"})
    data["expectations"][at : at + 1] = old
    path.write_text(json.dumps(data, indent=2))
    batch = _with(_with(make_batch(60, seed=7), "f0", [1, 2], np.nan), "f3", [4], np.inf)
    batch = _with(batch, "f1", [5], "abc")
    before = validate_batch(batch, "b", make_config(), path)
    assert before.statistics["gx"]["evaluated_expectations"] == len(data["expectations"])

    assert ensure_suite(home, make_config()) == path
    merged = json.loads(path.read_text())["expectations"]
    assert merged[at] == {
        "type": "expect_multicolumn_values_to_be_finite_numbers",
        "kwargs": {"column_list": ["f0", "f1", "f2"]},
        "meta": {},
        "severity": "critical",
    }
    assert merged[at + 1 : at + 4] == old[9:]  # f3's checks carry the user's meta: kept
    after = validate_batch(batch, "b", make_config(), path)
    assert after.statistics["gx"]["evaluated_expectations"] == len(data["expectations"]) - 8

    def found(report: ValidationReport) -> set[tuple]:
        return {(f.expectation, f.column, f.unexpected_count, f.message) for f in report.failures}

    assert not before.success and not after.success
    assert found(after) == found(before)
    assert {(k, c) for k, c, _, _ in found(after)} == {
        ("expect_column_values_to_not_be_null", "f0"),
        ("expect_column_values_to_be_in_type_list", "f1"),
        ("expect_column_values_to_be_between", "f3"),
    }


def test_malformed_suite_files_give_actionable_errors(tmp_path: Path) -> None:
    path = write_suite(build_suite(make_config()), tmp_path / "suite.json")
    assert len(load_suite(path).expectations) == len(build_suite(make_config()).expectations)
    text = path.read_text()
    path.write_text(text.replace('"expectations": [', '"expectations": [,', 1))
    with pytest.raises(ValueError, match=r"suite.json is not valid JSON \(line \d+"):
        load_suite(path)
    data = json.loads(text)
    data["expectations"][2]["kwargs"]["colum"] = data["expectations"][2]["kwargs"].pop("column")
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"expectation #2 \('expect_column_values_to_not_be_null"):
        load_suite(path)
    data["expectations"][1]["kwargs"]["column_list"] = ["f0"]  # the custom check is checked too
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"#1 .*multicolumn.*at least two columns"):
        load_suite(path)
    data["expectations"][1]["kwargs"]["column_list"] = ["f0", "f1"]
    data["expectations"][2] = {"type": "expect_the_unexpected", "kwargs": {}}
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"#2 .*expect_the_unexpected"):
        load_suite(path)
    with pytest.raises(FileNotFoundError, match="bootstrap"):
        validate_batch(make_batch(), "b", make_config(), tmp_path / "missing.json")


def test_bounds_from_config_take_precedence_and_inf_always_fails(tmp_path: Path) -> None:
    config = make_config(feature_bounds={"f0": (-1.0, 1.0)})
    suite_file = write_suite(build_suite(config), tmp_path / "s.json")  # f1..f3: finite only
    batch = _with(_with(make_batch(60, seed=3, shift=0.0), "f0", [0], 1.5), "f2", [1], -np.inf)
    batch.loc[2, "f3"] = 1e300  # huge but finite: no bounds configured for f3, so accepted
    report = validate_batch(batch, "b", config, suite_file)
    by_column = {f.column: f.message for f in report.failures}
    assert set(by_column) == {"f0", "f2"}
    assert "outside [-1, 1]" in by_column["f0"]
    assert "1 non-finite values (±inf)" in by_column["f2"]


def test_duplicates_within_tolerance_pass(tmp_path: Path) -> None:
    suite_file = _suite_for_tests(tmp_path)
    frame = make_batch(60, seed=5)
    few = pd.concat([frame, frame[:5]], ignore_index=True)  # 10 of 65 rows have a copy: 15%
    assert validate_batch(few, "b", make_config(), suite_file).success
    many = pd.concat([frame, frame[:8]], ignore_index=True)  # 16 of 68: 23.5% > 20%
    report = validate_batch(many, "b", make_config(), suite_file)
    assert [f.expectation for f in report.failures] == ["expect_compound_columns_to_be_unique"]


def test_text_column_batches(tmp_path: Path) -> None:
    config = make_config(n_features=0, features=[], text="text")
    suite_file = ensure_suite(tmp_path, config)
    frame = pd.DataFrame({"text": [f"message {i}" for i in range(30)], "label": [0, 1, 2] * 10})
    assert validate_batch(frame, "b", config, suite_file).success
    broken = _with(_with(frame, "text", [3], None), "text", [4], 12.5)
    messages = [f.message for f in validate_batch(broken, "b", config, suite_file).failures]
    assert any("column 'text' must hold ['str'] values" in m for m in messages)
    assert any("column 'text' has 1 missing value (null/NaN)" in m for m in messages)


def test_report_round_trips_and_renders(tmp_path: Path) -> None:
    failure = Failure("expect_column_values_to_be_between", "f1", 2, [np.inf, 1e9], "f1 | bad")
    report = ValidationReport("2026-11-21", False, 60, [failure], {"n_rows": 60}, None)
    parsed = json.loads(report.to_json())  # strict JSON: inf became a string
    assert parsed["failures"][0]["sample_values"] == ["inf", 1e9]
    assert ValidationReport.from_json(report.to_json()).failures[0].column == "f1"
    json_path, md_path = save_report(report, tmp_path / "reports")
    assert json_path.name == "2026-11-21.json" and md_path.name == "2026-11-21.md"
    markdown = md_path.read_text()
    assert "| expect_column_values_to_be_between | f1 | 2 |" in markdown
    assert "f1 \\| bad" in markdown  # table cells are escaped
    assert "\n" not in report.headline()
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == [
        "2026-11-21.json",
        "2026-11-21.md",
    ]


def test_read_error_report(zone: LandingZone, tmp_path: Path) -> None:
    zone.write_bytes("b", "a.csv", b"")
    frame, report = read_and_validate(zone, "b", make_config(), tmp_path / "unused.json")
    assert frame is None and not report.success and report.n_rows == 0
    assert report.statistics["read_error"]["file"] == "a.csv"
    assert "file 'a.csv'" in report.summary()


@pytest.mark.slow
def test_validation_latency_2000_rows_64_features(tmp_path: Path) -> None:
    """Measured for the report: first call (GX import + registration) and warm calls."""
    config = make_config(n_features=64)
    frame = make_batch(2000, 64, seed=1)
    suite_file = ensure_suite(tmp_path, config)
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        report = validate_batch(frame, "b", config, suite_file)
        timings.append(time.perf_counter() - started)
        assert (
            report.success and report.statistics["gx"]["evaluated_expectations"] == 6
        )  # columns + finite numbers over the 64 features + 4 (label, rows, duplicates)
    print(f"\nGX validate 2000x64: first {timings[0]:.2f}s, warm {min(timings[1:]):.2f}s")
    assert min(timings[1:]) < 30.0


def test_file_backed_context_stores_results_and_builds_data_docs(tmp_path: Path) -> None:
    """The flows' path: a Checkpoint in `<home>/gx/` whose action adds the batch's page."""
    home = tmp_path / "home"
    legacy = home / "expectations" / "evergreen-batch.json"  # where earlier releases wrote it
    write_suite(build_suite(make_config()), legacy)
    suite_file = ensure_suite(home, make_config())
    assert suite_file == suite_path(home) and not legacy.exists()  # moved, edits kept
    report = validate_batch(make_batch(60, seed=3), "2026-11-21", make_config(), suite_file,
                            gx_project=home)  # fmt: skip
    assert report.success
    page = Path(url2pathname(urlparse(report.statistics["data_docs"]).path))
    assert page.is_file() and "2026-11-21" in page.parts
    assert "values must never be null" in page.read_text()  # GX rendered each expectation
    assert "f0, f1, f2, f3 must be finite numbers" in page.read_text()  # the custom one too
    site = home / "gx" / "uncommitted" / "data_docs" / "local_site"
    assert "2026-11-21" in (site / "index.html").read_text()
    assert list((home / "gx" / "checkpoints").glob("evergreen-batch-*.json"))
    assert list((home / "gx" / "uncommitted" / "validations").rglob("*.json"))


def test_many_validations_keep_one_suite_and_a_bounded_data_docs_history(tmp_path: Path) -> None:
    """History must not make a validation slower or the store bigger: the widening accepted
    ranges are run-time parameters (the suite, checkpoint and suite page stay the same), GX
    keeps the newest `data.data_docs_keep` results, and the index reads at most that many."""
    from great_expectations.render.renderer.site_builder import DefaultSiteIndexBuilder

    from data_plane.profile import DataProfile

    home, cfg = tmp_path / "home", make_config(data_docs_keep=3)
    suite_file = ensure_suite(home, cfg)
    profile, read_by_index = DataProfile(), []
    original = DefaultSiteIndexBuilder._add_validations_to_index_links

    def counting(self, links, keys):  # type: ignore[no-untyped-def]
        original(self, links, keys)
        read_by_index.append(len(links.get("validations_links", [])))

    DefaultSiteIndexBuilder._add_validations_to_index_links = counting  # type: ignore[method-assign]
    try:
        for i in range(7):
            frame = make_batch(60, seed=i)
            report = validate_batch(
                frame, f"b{i}", cfg, suite_file, profile=profile, gx_project=home
            )
            assert report.success
            profile = profile.updated(frame, cfg.features, cfg.label)
    finally:
        DefaultSiteIndexBuilder._add_validations_to_index_links = original  # type: ignore[method-assign]
    gx = home / "gx"
    # the user's suite file, its copy for the first batch (nothing accepted yet) and the copy
    # with change checks for every later batch: not one per run
    assert len(list((gx / "expectations").glob("evergreen-batch*.json"))) == 3
    assert len(list((gx / "checkpoints").glob("*.json"))) == 2
    assert len(list((gx / "uncommitted" / "validations").rglob("*.json"))) == 3
    pages = list((gx / "uncommitted" / "data_docs" / "local_site" / "validations").rglob("*.html"))
    assert len(pages) == 3 and {p.parts[-3] for p in pages} == {"b4", "b5", "b6"}
    assert max(read_by_index) == 3 and read_by_index[-1] == 3
    # the range check still compares with the data accepted so far (parameters filled in)
    shifted = make_batch(60, seed=99)
    shifted[cfg.features[0]] += 100.0
    report = validate_batch(shifted, "moved", cfg, suite_file, profile=profile, gx_project=home)
    assert any("beyond the range accepted so far" in w.message for w in report.warnings)


@pytest.mark.parametrize("error_class", ["StoreBackendError", "ExpectationSuiteError"])
def test_a_definition_another_flow_added_meanwhile_is_read_not_re_added(error_class):
    """Two cadences validating at once on one context: both miss the checkpoint, the loser's
    add fails with GX's "already has the following key" and must read the winner's instead
    (seen in the load test as a failed monthly run; for a suite GX wraps the store's error in
    an ExpectationSuiteError)."""
    from great_expectations.exceptions import exceptions
    from great_expectations.exceptions.exceptions import StoreBackendError

    raised = getattr(exceptions, error_class)

    from data_plane.gx_run import _get_or_add

    class RacedStore:
        def __init__(self):
            self.stored = None

        def get(self, name):
            if self.stored is None:
                self.stored = f"{name} stored by the other flow"  # it wins the race now
                raise KeyError(name)
            return self.stored

        def add(self, item):
            raise raised(f"Store already has the following key: ('{item.name}',).")

    class Item:
        name = "evergreen-batch-1"

    assert _get_or_add(RacedStore(), Item()) == "evergreen-batch-1 stored by the other flow"

    class BrokenStore(RacedStore):
        def add(self, item):
            raise StoreBackendError("permission denied")

    with pytest.raises(StoreBackendError, match="permission denied"):
        _get_or_add(BrokenStore(), Item())


def test_a_suite_another_flow_added_meanwhile_is_read_from_the_real_store(tmp_path):
    """The same race on GX's real suite store, where the loser's error is an
    `ExpectationSuiteError` (seen in a 20-round load run as a failed monthly run)."""
    import great_expectations as gx

    from data_plane.gx_run import _get_or_add

    context = gx.get_context(mode="file", project_root_dir=str(tmp_path))
    name = "evergreen-batch-raced"
    context.suites.add(gx.ExpectationSuite(name=name))  # the other flow's add, already on disk

    class MissedOnce:
        """The real store, whose first look-up ran before the other flow wrote the suite."""

        def __init__(self, store):
            self.store, self.missed = store, False

        def get(self, key):
            if not self.missed:
                self.missed = True
                raise KeyError(key)
            return self.store.get(key)

        def add(self, item):
            return self.store.add(item)

    got = _get_or_add(MissedOnce(context.suites), gx.ExpectationSuite(name=name))
    assert got.name == name


def test_validation_waits_for_another_process_on_the_same_gx_project(tmp_path: Path) -> None:
    """A Prefect worker runs each cadence's flow run as its own process on one home; GX's file
    stores write items in place, so a process reading a checkpoint another one was writing
    failed ("… was found, but it is not a Checkpoint", seen in the load test). Validations of
    one GX project therefore take turns across processes: this one waits for the holder."""
    import subprocess

    home, cfg = tmp_path / "home", make_config()
    suite_file = ensure_suite(home, cfg)
    hold = 3.0
    holder = subprocess.Popen(  # another flow run's process, inside its GX operation
        [sys.executable, "-c", "import sys, time\nfrom data_plane.gx_suite import gx_lock\n"
         f"with gx_lock({str(home)!r}):\n    print('held', flush=True)\n    time.sleep({hold})"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        report = validate_batch(make_batch(60, seed=3), "b1", cfg, suite_file, gx_project=home)
        waited = time.monotonic() - started
    finally:
        holder.wait(timeout=60)
    assert report.success
    assert waited >= hold - 1.0, f"validated after {waited:.1f} s, inside the other's lock"
