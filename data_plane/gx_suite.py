"""The integrity suite: built from the config, kept as a file the user may edit, upgraded.

`data_plane.validation` says what the checks are and why integrity blocks and change informs.
This module is the suite's side, apart from running it (`data_plane.gx_run`) because the suite
is a JSON file the user owns, written once per home, while a run happens for every batch:

- `build_suite`: the blocking integrity checks from `data.*` (every check critical).
- `ensure_suite`: the suite file `<home>/gx/expectations/<name>.json` (GX's own suite store),
  written from the config when missing, and rewritten when the `data` config changed and the
  file is still as evergreen generated it (its `meta` holds the digest of what was generated):
  a suite nobody edited follows the config, one the user edited is kept. A suite written by
  an earlier release is moved there and upgraded in place (first-batch bounds dropped,
  per-column checks merged), the user's edits kept. With `data.gx_store` (S3) the shared copy
  is pulled first and pushed after.
- `load_suite` / `parse_suite`: read a (possibly hand-edited) file, naming what is wrong in it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from continual.files import atomic_write_text
from data_plane.gx_store import shared_store
from data_plane.landing import data_columns
from model_registry.locking import promotion_lock

if TYPE_CHECKING:
    import great_expectations as gx

    from evergreen.config import DataConfig

log = logging.getLogger(__name__)

FINITE_MAX = sys.float_info.max
NUMERIC_TYPES = ["int", "float"] + [f"int{b}" for b in (8, 16, 32, 64)]
NUMERIC_TYPES += [f"uint{b}" for b in (8, 16, 32, 64)] + ["float16", "float32", "float64"]
TEXT_TYPES = ["str"]
# one GX operation at a time in this process: GX's context is not thread-safe, and with
# data.gx_store the pulls and pushes of `<home>/gx/` must not interleave (`gx_lock` takes it)
GX_LOCK = threading.Lock()
SUITE_NAME = "evergreen-batch"
GX_FOLDER = "gx"  # the file-backed Data Context under home
GX_LOCK_SECONDS = 600.0  # a validation of a large batch plus an S3 sync, with room to spare
# the suite's `meta` key holding the digest of the expectations evergreen generated: equal to
# the file's own expectations = nobody edited them, so a changed `data` config may rewrite them
GENERATED_DIGEST = "evergreen_generated_sha256"


@contextlib.contextmanager
def gx_lock(home: Path | None) -> Iterator[None]:
    """One GX operation at a time on the project `<home>/gx/`, across threads and processes.

    GX's file stores write a checkpoint, validation definition or result in place (not via a
    rename): a Prefect worker running several cadences' flow runs as separate processes on one
    home saw a half-written checkpoint ("… was found, but it is not a Checkpoint") and failed
    the run. So besides `GX_LOCK` (this process) an exclusive `flock` on `<home>/gx/evergreen.lock`
    serialises the processes of one host; the kernel drops it when its holder dies. `home`
    None (an ephemeral context, nothing on disk) takes the thread lock only.
    """
    with GX_LOCK:
        if home is None:
            yield
            return
        folder = Path(home) / GX_FOLDER
        with promotion_lock("evergreen", folder, GX_LOCK_SECONDS, "Great Expectations project"):
            yield


def build_suite(data_cfg: DataConfig, *, name: str = SUITE_NAME) -> gx.ExpectationSuite:
    """The integrity suite for `data_cfg` (see the module docstring); every check is critical.

    Bounds come only from `data.feature_bounds` (declared by the user); other features are only
    required to be finite — GX's between treats inf as an ordinary large number, so ±inf is
    caught by bounds of ± the largest finite float.
    """
    import great_expectations as gx
    import great_expectations.expectations as gxe

    from data_plane.gx_expectations import ExpectMulticolumnValuesToBeFiniteNumbers

    label = data_cfg.label
    columns = data_columns(data_cfg)
    expectations: list[gxe.Expectation] = []  # no context needed (suite.add_expectation needs one)
    add = expectations.append
    # one table-level check for every column, not one `expect_column_to_exist` per column: GX
    # spends ≈ 10 ms of graph building per expectation whatever it checks (extra columns are
    # `_extra_columns`' business, so the batch may hold more)
    add(gxe.ExpectTableColumnsToMatchSet(column_set=columns, exact_match=False))
    features = list(data_cfg.features)
    if len(features) >= 2:  # GX's multicolumn checks need two columns
        # one check for "not null, a number, finite" of every feature instead of three per
        # feature (≈ 25–40 ms of GX graph building each); `messages` reports it per column
        add(ExpectMulticolumnValuesToBeFiniteNumbers(column_list=features))
    for feature in features:
        low, high, source = _declared_bounds(feature, data_cfg)
        if len(features) < 2:
            add(gxe.ExpectColumnValuesToBeInTypeList(column=feature, type_list=NUMERIC_TYPES))
            add(gxe.ExpectColumnValuesToNotBeNull(column=feature))
        elif source != "data.feature_bounds":
            continue
        add(
            gxe.ExpectColumnValuesToBeBetween(
                column=feature, min_value=low, max_value=high, meta={"bounds_from": source}
            )
        )
    if data_cfg.text:
        add(gxe.ExpectColumnValuesToBeInTypeList(column=data_cfg.text, type_list=TEXT_TYPES))
        add(gxe.ExpectColumnValuesToNotBeNull(column=data_cfg.text))
    add(gxe.ExpectColumnValuesToNotBeNull(column=label))
    add(gxe.ExpectColumnValuesToBeInSet(column=label, value_set=list(data_cfg.classes)))
    add(
        gxe.ExpectTableRowCountToBeBetween(min_value=data_cfg.min_rows, max_value=data_cfg.max_rows)
    )
    add(
        gxe.ExpectCompoundColumnsToBeUnique(
            column_list=columns,
            mostly=round(1.0 - data_cfg.max_duplicate_fraction, 12),
            meta={"tolerated_duplicate_fraction": data_cfg.max_duplicate_fraction},
        )
    )
    return gx.ExpectationSuite(name=name, expectations=expectations)


def _declared_bounds(feature: str, data_cfg: DataConfig) -> tuple[float, float, str]:
    if feature in data_cfg.feature_bounds:
        low, high = data_cfg.feature_bounds[feature]
        return float(low), float(high), "data.feature_bounds"
    return -FINITE_MAX, FINITE_MAX, "finite values only"


def suite_path(home: Path, name: str = SUITE_NAME) -> Path:
    """Where the suite lives: GX's own suite store, `<home>/gx/expectations/<name>.json`."""
    return Path(home) / GX_FOLDER / "expectations" / f"{name}.json"


def _legacy_suite_path(home: Path, name: str = SUITE_NAME) -> Path:
    return Path(home) / "expectations" / f"{name}.json"


def write_suite(suite: gx.ExpectationSuite, path: Path) -> Path:
    """Write `suite` as indented GX JSON (atomic); returns `path`."""
    return _write_suite_json(_suite_json(suite), path)


def _suite_json(suite: gx.ExpectationSuite) -> dict[str, Any]:
    """The suite as the file holds it: plain JSON types, without GX's store id."""
    data: dict[str, Any] = json.loads(json.dumps(suite.to_json_dict()))
    data.pop("id", None)
    return data


def _write_suite_json(data: dict[str, Any], path: Path) -> Path:
    atomic_write_text(Path(path), json.dumps(data, indent=2) + "\n")
    return Path(path)


def load_suite(path: Path) -> gx.ExpectationSuite:
    """Read a (possibly hand-edited) suite file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not valid JSON or an expectation in it is invalid (names which).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"expectation suite {path} not found: run the bootstrap flow to create it"
        )
    return parse_suite(path.read_text(encoding="utf-8"), path)


def parse_suite(text: str, path: Path) -> gx.ExpectationSuite:
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import (
        ExpectationConfiguration,
    )
    from great_expectations.expectations.metadata_types import FailureSeverity

    import data_plane.gx_expectations  # noqa: F401  registers the custom expectation by name

    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "fix it, or delete it to have it regenerated from the config"
        ) from exc
    if not isinstance(data, dict) or not isinstance(data.get("expectations"), list):
        raise ValueError(f"{path}: expected an object with an `expectations` list")
    expectations = []
    for index, item in enumerate(data["expectations"]):
        kind = item.get("type") if isinstance(item, dict) else None
        try:
            config = ExpectationConfiguration(
                type=str(kind),
                kwargs=dict(item.get("kwargs") or {}),
                meta=item.get("meta"),
                severity=FailureSeverity(item.get("severity") or "critical"),
            )
            expectations.append(config.to_domain_obj())
        except Exception as exc:
            raise ValueError(
                f"{path}: expectation #{index} ({kind!r}) is invalid: {exc}".replace("\n", " ")
            ) from exc
    return gx.ExpectationSuite(
        name=str(data.get("name") or path.stem),
        expectations=expectations,
        meta=data.get("meta") or None,
        notes=data.get("notes"),
    )


def ensure_suite(home: Path, data_cfg: DataConfig) -> Path:
    """Write the suite from the config if missing; otherwise keep (and check) the user's file.

    Suites written by earlier releases held bounds inferred from the first batch; those turned
    every genuine shift into a quarantine, so they are replaced by finite-only checks (declared
    bounds and the user's own edits are kept). With `data.gx_store` (S3) the shared copy is
    pulled first and the result pushed, so every worker validates with the same suite.
    """
    store = shared_store(data_cfg.gx_store)
    if store is None:
        return _ensure_suite_file(home, data_cfg)
    with gx_lock(home):  # with data.gx_store the suite in S3 is the one every worker uses
        store.pull(Path(home) / GX_FOLDER)
        path = _ensure_suite_file(home, data_cfg)
        store.push(Path(home) / GX_FOLDER)
    return path


def _expectations_digest(expectations: list[Any]) -> str:
    return hashlib.sha256(json.dumps(expectations, sort_keys=True).encode()).hexdigest()


def _generated(data_cfg: DataConfig) -> dict[str, Any]:
    """The suite file's content for `data_cfg`, stamped with the digest of its expectations."""
    data = _suite_json(build_suite(data_cfg))
    data["meta"] = {
        **(data.get("meta") or {}),
        GENERATED_DIGEST: _expectations_digest(data["expectations"]),
    }
    return data


def _follow_config(path: Path, data_cfg: DataConfig) -> None:
    """Rewrite a suite nobody edited (its expectations still match the generated digest) when
    the `data` config no longer generates the same expectations: a user who corrects
    `data.label`, `data.features` or `data.classes` after a first run must not be validated
    against the suite of the old config. A suite without the digest (edited, or written by an
    earlier release) is left as it is."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        return  # load_suite names what is wrong with it
    items = data.get("expectations")
    stamp = (data.get("meta") or {}).get(GENERATED_DIGEST)
    if not stamp or not isinstance(items, list) or stamp != _expectations_digest(items):
        return
    fresh = _generated(data_cfg)
    if fresh["expectations"] == items:
        return
    _write_suite_json(fresh, path)
    log.warning("%s: regenerated from the changed data config (the file had not been edited)", path)


def _ensure_suite_file(home: Path, data_cfg: DataConfig) -> Path:
    path = suite_path(home)
    legacy = _legacy_suite_path(home)
    if not path.exists() and legacy.exists():  # written by an earlier release: move, keep edits
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(legacy, path)
        log.warning("moved the expectation suite %s into GX's suite store: %s", legacy, path)
    if not path.exists():
        return _write_suite_json(_generated(data_cfg), path)
    _follow_config(path, data_cfg)
    _drop_inferred_bounds(path)
    _merge_column_checks(path)
    _merge_finite_checks(path)
    suite = load_suite(path)
    covered = {getattr(e, "column", None) for e in suite.expectations}
    for expectation in suite.expectations:  # table-level checks name their columns in a set
        covered.update(getattr(expectation, "column_set", None) or ())
    expected = data_columns(data_cfg)
    stale = [c for c in expected if c not in covered]
    if stale:
        log.warning(
            "%s has no expectation on configured columns %s (the file was edited, or written "
            "for another data config): add them, or delete the file to have it regenerated "
            "from the config",
            path,
            stale,
        )
    return path


def _merge_column_checks(path: Path) -> None:
    """Suites written before the table-level column check hold one `expect_column_to_exist` per
    column (≈ 10 ms of GX's time each, every run): the plain ones (no meta, critical) become one
    `expect_table_columns_to_match_set` in the place of the first — the same verdicts, since
    each missing column still fails it. Ones the user gave a severity or meta are kept as is."""
    data = json.loads(path.read_text(encoding="utf-8"))
    items = data.get("expectations", [])
    plain = [
        index
        for index, item in enumerate(items)
        if item.get("type") == "expect_column_to_exist"
        and set(item.get("kwargs") or {}) == {"column"}
        and not item.get("meta")
        and (item.get("severity") or "critical") == "critical"
    ]
    if len(plain) < 2:
        return
    columns = [items[index]["kwargs"]["column"] for index in plain]
    merged = {
        "type": "expect_table_columns_to_match_set",
        "kwargs": {"column_set": columns, "exact_match": False},
        "meta": {},
        "severity": "critical",
    }
    data["expectations"] = _collapse(items, plain, merged)
    log.warning(
        "%s: merged %d expect_column_to_exist checks into one expect_table_columns_to_match_set",
        path,
        len(plain),
    )
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _collapse(items: list[Any], indices: list[int], merged: dict[str, Any]) -> list[Any]:
    """`items` with the ones at `indices` replaced by `merged`, in the place of the first."""
    first, gone = min(indices), set(indices)
    return [
        merged if i == first else item
        for i, item in enumerate(items)
        if i == first or i not in gone
    ]


def _plain_finite_check(item: dict[str, Any]) -> str | None:
    """The feature an untouched per-column integrity check of an older suite is about (not
    null, numeric type, ± the largest finite float), or None: a check the user edited, gave a
    severity or tighter bounds stays as it is."""
    kwargs = dict(item.get("kwargs") or {})
    if (item.get("severity") or "critical") != "critical" or not isinstance(
        kwargs.get("column"), str
    ):
        return None
    kind, meta = item.get("type"), item.get("meta") or {}
    plain = {
        "expect_column_values_to_not_be_null": set(kwargs) == {"column"} and not meta,
        "expect_column_values_to_be_in_type_list": kwargs.get("type_list") == NUMERIC_TYPES
        and set(kwargs) == {"column", "type_list"}
        and not meta,
        "expect_column_values_to_be_between": kwargs.get("min_value") == -FINITE_MAX
        and kwargs.get("max_value") == FINITE_MAX
        and set(kwargs) == {"column", "min_value", "max_value"}
        and meta in ({}, {"bounds_from": "finite values only"}),
    }
    return str(kwargs["column"]) if plain.get(str(kind)) else None


def _merge_finite_checks(path: Path) -> None:
    """Suites written before the finite-numbers check hold three checks per feature (≈ 25–40
    ms of GX's time each, every run): the features whose three are untouched get one
    `expect_multicolumn_values_to_be_finite_numbers` in the place of the first — the same
    verdicts (a null, a non-number or ±inf still fails, reported per column)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    items = data.get("expectations", [])
    kinds: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        column = _plain_finite_check(item)
        if column is not None:
            kinds.setdefault(column, []).append(index)
    whole = {c: i for c, i in kinds.items() if len({items[j]["type"] for j in i}) == len(i) == 3}
    if len(whole) < 2:
        return
    merged = {
        "type": "expect_multicolumn_values_to_be_finite_numbers",
        "kwargs": {"column_list": list(whole)},
        "meta": {},
        "severity": "critical",
    }
    gone = [index for indices in whole.values() for index in indices]
    data["expectations"] = _collapse(items, gone, merged)
    log.warning(
        "%s: merged the null/type/finite checks of %d features into one "
        "expect_multicolumn_values_to_be_finite_numbers",
        path,
        len(whole),
    )
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _drop_inferred_bounds(path: Path) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    changed = 0
    for item in data.get("expectations", []):
        if (item.get("meta") or {}).get("bounds_from") == "inferred at bootstrap":
            item["kwargs"].update(min_value=-FINITE_MAX, max_value=FINITE_MAX)
            item["meta"]["bounds_from"] = "finite values only"
            changed += 1
    if changed:
        log.warning("%s: replaced %d first-batch bounds by finite-only checks", path, changed)
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")
