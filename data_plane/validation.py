"""Batch validation with Great Expectations: integrity blocks, change informs.

Two kinds of checks, kept apart because they call for opposite reactions:

- **Integrity** (GX severity `critical`, blocking: the batch is quarantined, its files untouched):
  unreadable files, missing or extra columns, wrong types (text in a numeric column), nulls and
  ±inf, labels outside `data.classes`, too few/many rows, duplicates beyond
  `data.max_duplicate_fraction`, and bounds the user *declared* in `data.feature_bounds`. These
  live in the suite `<home>/gx/expectations/<name>.json`, in the suite store of the file-backed
  GX Data Context `<home>/gx/`, written once from the config and the user's to edit afterwards. One more blocking check has no GX
  expectation: gross, batch-wide breakage (most features far outside everything accepted so
  far — a unit switch), decided by `data_plane.profile.gross_change`.
- **Change** (GX severity `warning`, informing): values beyond the range accepted so far
  (`expect_column_values_to_be_between` with `mostly`, generated at each run from the
  `DataProfile` of all accepted data, so it widens as data is accepted and one extreme value
  never decides anything), KS/PSI drift against the accepted data, a class mix never seen
  before. They go to the report, the drift report and the run; `data.change.block` makes chosen
  ones blocking.

Every batch is validated by a GX Checkpoint (one per suite content: the user's suite plus the
change checks of the run) in the file-backed context `<home>/gx/` when the flows call it, whose
UpdateDataDocsAction adds the batch's page to the Data Docs site
(`<home>/gx/uncommitted/data_docs/local_site/index.html`; validation results are stored beside
it); library callers that pass no project get an ephemeral context (nothing written). With
`data.gx_store: s3://bucket/prefix` (several workers) the context's stores are shared in S3:
`<home>/gx/` is synced with it around each validation and the Data Docs URL is the page's in
the bucket (`data_plane.gx_store` says why a sync and not a GX store backend). The
context is opened once per process (GX is slow to start). The result is turned into a
`ValidationReport` whose failures and warnings each name the expectation, column, row count,
sample values and what was expected.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from data_plane import messages, text_validation
from data_plane.drift import drift_report
from data_plane.gx_store import S3GxStore, shared_store
from data_plane.landing import COLUMNS_IN_FILES_ATTR, LandingZone, data_columns, read_batch
from data_plane.messages import Failure, ValidationReport
from data_plane.profile import DataProfile, GrossChangeRule, class_mix_change, gross_change
from data_plane.readers import SOURCE_COLUMN, BatchReadError

if TYPE_CHECKING:
    import great_expectations as gx

    from evergreen.config import DataConfig

log = logging.getLogger(__name__)

FINITE_MAX = sys.float_info.max
NUMERIC_TYPES = ["int", "float"] + [f"int{b}" for b in (8, 16, 32, 64)]
NUMERIC_TYPES += [f"uint{b}" for b in (8, 16, 32, 64)] + ["float16", "float32", "float64"]
TEXT_TYPES = ["str"]
# BASIC, not SUMMARY: SUMMARY adds two metrics per column check (the unexpected rows' index list
# and query), a fifth of the validation's time; the messages find a failure's rows in the frame
# themselves (`messages.unexpected_rows`), and the sample values and counts come with BASIC.
RESULT_FORMAT = {"result_format": "BASIC", "partial_unexpected_count": 10}
_GX_LOCK = threading.Lock()
SUITE_NAME = "evergreen-batch"


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


def change_expectations(data_cfg: DataConfig, profile: DataProfile | None) -> list[Any]:
    """Range checks against the data accepted so far: severity `warning` unless the user put
    "range" in `data.change.block`. `mostly` lets a few extreme values through.

    The bounds are GX expectation parameters (`{"$PARAMETER": ...}`), filled in at run time by
    `change_parameters`: the ranges widen with every accepted batch, and baking them into the
    suite made every run register a new suite, validation definition and checkpoint (a
    second each, a suite file and a suite page per run, and one more cached checkpoint in the
    process). With parameters the suite depends only on the features and the policy.
    """
    import great_expectations.expectations as gxe
    from great_expectations.expectations.metadata_types import FailureSeverity

    blocking = "range" in data_cfg.change.block
    severity = FailureSeverity.CRITICAL if blocking else FailureSeverity.WARNING
    expectations = []
    for index, feature in _ranged_features(data_cfg, profile):
        expectations.append(
            gxe.ExpectColumnValuesToBeBetween(
                column=feature,
                min_value={"$PARAMETER": f"range_low_{index}"},
                max_value={"$PARAMETER": f"range_high_{index}"},
                mostly=data_cfg.change.range_mostly,
                severity=severity,
                meta={"bounds_from": "accepted data"},
            )
        )
    return expectations


def change_parameters(data_cfg: DataConfig, profile: DataProfile | None) -> dict[str, float]:
    """The values of the parameters `change_expectations` refers to: the accepted ranges."""
    values: dict[str, float] = {}
    if profile is None:
        return values
    for index, feature in _ranged_features(data_cfg, profile):
        known = profile.ranges[feature]
        values[f"range_low_{index}"] = float(known.low)
        values[f"range_high_{index}"] = float(known.high)
    return values


def _ranged_features(data_cfg: DataConfig, profile: DataProfile | None) -> list[tuple[int, str]]:
    """(position, feature) of the features with an accepted range and no declared bounds; the
    position names the parameters (GX parameter names cannot hold arbitrary column names)."""
    if profile is None or profile.empty:
        return []
    return [
        (index, feature)
        for index, feature in enumerate(data_cfg.features)
        if profile.ranges.get(feature) is not None and feature not in data_cfg.feature_bounds
    ]


GX_FOLDER = "gx"  # the file-backed Data Context under home


def suite_path(home: Path, name: str = SUITE_NAME) -> Path:
    """Where the suite lives: GX's own suite store, `<home>/gx/expectations/<name>.json`."""
    return Path(home) / GX_FOLDER / "expectations" / f"{name}.json"


def _legacy_suite_path(home: Path, name: str = SUITE_NAME) -> Path:
    return Path(home) / "expectations" / f"{name}.json"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_suite(suite: gx.ExpectationSuite, path: Path) -> Path:
    """Write `suite` as indented GX JSON (atomic); returns `path`."""
    data = suite.to_json_dict()
    data.pop("id", None)
    _atomic_write(Path(path), json.dumps(data, indent=2) + "\n")
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
    return _parse_suite(path.read_text(encoding="utf-8"), path)


def _parse_suite(text: str, path: Path) -> gx.ExpectationSuite:
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
    with _GX_LOCK:  # with data.gx_store the suite in S3 is the one every worker uses
        store.pull(Path(home) / GX_FOLDER)
        path = _ensure_suite_file(home, data_cfg)
        store.push(Path(home) / GX_FOLDER)
    return path


def _ensure_suite_file(home: Path, data_cfg: DataConfig) -> Path:
    path = suite_path(home)
    legacy = _legacy_suite_path(home)
    if not path.exists() and legacy.exists():  # written by an earlier release: move, keep edits
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(legacy, path)
        log.warning("moved the expectation suite %s into GX's suite store: %s", legacy, path)
    if not path.exists():
        return write_suite(build_suite(data_cfg), path)
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
        log.warning("%s has no expectation on configured columns %s: edit/delete it", path, stale)
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
    _atomic_write(path, json.dumps(data, indent=2) + "\n")


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
    _atomic_write(path, json.dumps(data, indent=2) + "\n")


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
        _atomic_write(path, json.dumps(data, indent=2) + "\n")


@functools.cache
def _gx_runtime(project: str | None = None) -> tuple[Any, Any]:
    """One GX context + pandas batch definition per process and project (GX starts slowly).

    `project` None: an ephemeral context (nothing written); else the file-backed Data Context
    `<project>/gx/` that keeps suites, checkpoints, validation results and Data Docs.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    import data_plane.gx_expectations  # noqa: F401  stored suites may name the custom check

    context: Any = (
        gx.get_context(mode="ephemeral")
        if project is None
        else gx.get_context(mode="file", project_root_dir=project)
    )
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    try:  # a file-backed project keeps its data source: reuse it (stored definitions refer to it)
        asset = context.data_sources.get("evergreen").get_asset("batch")
        return context, asset.get_batch_definition("whole")
    except Exception:  # GX raises source/asset-specific "not found" errors
        source = context.data_sources.add_or_update_pandas("evergreen")
        asset = source.add_dataframe_asset("batch")
        return context, asset.add_batch_definition_whole_dataframe("whole")


def _gx_frame(df: pd.DataFrame) -> pd.DataFrame:
    """GX 1.24 does not know pandas' `str` dtype: hand it object columns (values unchanged)."""
    frame = df.reset_index(drop=True)
    strings = [c for c in frame.columns if pd.api.types.is_string_dtype(frame[c].dtype)]
    return frame.astype(dict.fromkeys(strings, object)) if strings else frame


_CHECKPOINTS: dict[tuple[str | None, str], Any] = {}  # (project, content sha256) → checkpoint


def _checkpoint_for(
    suite_file: Path, extra: list[Any], project: Path | None, keep_results: int = 30
) -> Any:
    """The Checkpoint validating the suite file plus `extra` expectations, created once per
    process, project and content; in a file-backed project it updates the Data Docs.

    Registering a suite costs ~0.1 s, updating one in place several seconds (GX saves each
    expectation), so a changed suite is registered anew under a content-derived name (the
    suite, validation definition and checkpoint share it).
    """
    import great_expectations as gx
    from great_expectations.checkpoint.actions import UpdateDataDocsAction, ValidationAction

    text = Path(suite_file).read_text(encoding="utf-8")
    extra_json = json.dumps([e.configuration.to_json_dict() for e in extra], sort_keys=True)
    digest = hashlib.sha256((text + extra_json).encode("utf-8")).hexdigest()
    key = (None if project is None else str(project), digest)
    if key not in _CHECKPOINTS:
        suite = _parse_suite(text, Path(suite_file))
        for expectation in extra:
            suite.expectations.append(expectation)
        suite.name = f"{suite.name}-{digest[:12]}"
        context, batch_definition = _gx_runtime(key[0])
        if project is not None:
            bound_data_docs_index(context, keep_results)
        suite = _get_or_add(context.suites, suite)
        definition = _get_or_add(
            context.validation_definitions,
            gx.ValidationDefinition(name=suite.name, data=batch_definition, suite=suite),
        )
        actions: list[ValidationAction] = (
            [] if project is None else [UpdateDataDocsAction(name="update_data_docs")]
        )
        checkpoint = gx.Checkpoint(
            name=suite.name,
            validation_definitions=[definition],
            actions=actions,
            result_format=RESULT_FORMAT,
        )
        _CHECKPOINTS[key] = _get_or_add(context.checkpoints, checkpoint)
    return _CHECKPOINTS[key]


def bound_data_docs_index(context: Any, limit: int) -> None:
    """Make every Data Docs site list (and read) at most the newest `limit` validation results.

    GX's default index builder loads every stored validation result to draw the index, and
    UpdateDataDocsAction rebuilds the index after each validation: without a limit a run's cost
    grows with the number of batches ever validated. `validation_results_limit` is GX's own
    setting; it is saved in `great_expectations.yml` so a manual `build_data_docs` is bounded too.
    """
    sites = dict(context.variables.data_docs_sites or {})
    changed = False
    for name, site in sites.items():
        builder = dict(site.get("site_index_builder") or {"class_name": "DefaultSiteIndexBuilder"})
        if builder.get("validation_results_limit") != limit:
            builder["validation_results_limit"] = limit
            sites[name] = {**site, "site_index_builder": builder}
            changed = True
    if changed:
        context.variables.data_docs_sites = sites
        context.variables.save()


def prune_validation_results(context: Any, keep: int) -> int:
    """Delete all but the newest `keep` validation results from the context's results store;
    how many were deleted. Their Data Docs pages go with the next Data Docs build (GX removes
    pages whose result is gone). The batch's own report under `<home>/reports/validation/`
    stays: the GX result is the browsable copy, kept for recent batches only."""
    store = context.validation_results_store
    keys = sorted(store.list_keys(), key=lambda key: key.run_id.run_time, reverse=True)
    for key in keys[max(keep, 0) :]:
        store.remove_key(key)
    return max(len(keys) - max(keep, 0), 0)


def _get_or_add(store: Any, item: Any) -> Any:
    """A GX store's item by name (saved by an earlier process), else `item` added.

    Flows of several cadences validate at once on one file-backed context: two may both miss
    the item and both add it; the loser's add fails with GX's "Store already has the following
    key", and the item the winner stored (the same definition) is read instead. GX reports it
    as `StoreBackendError` (checkpoints, validation definitions), wrapped in
    `ExpectationSuiteError` (a suite saved meanwhile), or as "already exists" (a suite the
    factory found before saving): all are `DataContextError`s."""
    try:
        return store.get(item.name)
    except Exception:  # GX raises store-specific "not found" errors
        pass
    from great_expectations.exceptions.exceptions import DataContextError  # lazy: GX is heavy

    try:
        return store.add(item)
    except DataContextError as error:
        if "already has" not in str(error) and "already exists" not in str(error):
            raise
        return store.get(item.name)


def run_suite(
    frame: pd.DataFrame,
    suite_file: Path,
    extra: list[Any] | None = None,
    *,
    project: Path | None = None,
    run_name: str | None = None,
    parameters: dict[str, float] | None = None,
    keep_results: int = 30,
    store: S3GxStore | None = None,
) -> dict[str, Any]:
    """Run the suite in `suite_file` (plus `extra` expectations, whose `$PARAMETER`s take
    their values from `parameters`) on `frame` through a GX Checkpoint; GX's result, plus
    `data_docs_url` (this validation's Data Docs page) when `project` is a file-backed project
    folder (`<project>/gx/`), which keeps the newest `keep_results` validation results. With
    `store` (`data.gx_store` in S3), the project is pulled before and pushed after, and the
    URL is the page's in S3.

    Raises:
        FileNotFoundError, ValueError: see `load_suite`.
    """
    import great_expectations as gx

    if not Path(suite_file).exists():
        load_suite(suite_file)  # raises the actionable FileNotFoundError
    with _GX_LOCK:
        if store is not None and project is not None:
            store.pull(Path(project) / GX_FOLDER)
        checkpoint = _checkpoint_for(suite_file, list(extra or []), project, keep_results)
        if project is not None:  # before the run: its Data Docs build drops the pruned pages
            prune_validation_results(_gx_runtime(str(project))[0], keep_results - 1)
        result = checkpoint.run(
            batch_parameters={"dataframe": frame},
            expectation_parameters=dict(parameters or {}),
            run_id=gx.RunIdentifier(run_name=run_name, run_time=datetime.now(UTC)),
        )
        ((identifier, suite_result),) = result.run_results.items()
        summary: dict[str, Any] = suite_result.to_json_dict()
        if project is not None:
            context, _ = _gx_runtime(str(project))
            urls = context.get_docs_sites_urls(resource_identifier=identifier)
            summary["data_docs_url"] = urls[0].get("site_url") if urls else None
            if store is not None:
                store.push(Path(project) / GX_FOLDER)
                if summary["data_docs_url"]:
                    url = store.url_for(Path(project) / GX_FOLDER, summary["data_docs_url"])
                    summary["data_docs_url"] = url
    return summary


def validate_batch(
    df: pd.DataFrame,
    batch_id: str,
    data_cfg: DataConfig,
    suite_file: Path,
    *,
    profile: DataProfile | None = None,
    reference: pd.DataFrame | None = None,
    gx_project: Path | None = None,
) -> ValidationReport:
    """Validate one batch: integrity checks block, change checks inform (module docstring).

    Args:
        df: the batch as returned by `read_batch` (`_source_file` is used to name files).
        batch_id: for the report.
        data_cfg: columns, classes and the change policy (`data.change`).
        suite_file: the integrity suite JSON (see `ensure_suite`).
        profile: what the data accepted so far looked like (None or empty for the first batch).
        reference: a sample of the accepted data for KS/PSI drift (None: no drift check).
        gx_project: the folder holding the file-backed GX project (`<home>`, so `<home>/gx/`):
            the validation result is stored and Data Docs updated there; None: in memory.

    Returns:
        The report; `success` is False if any blocking check failed. With `gx_project`,
        `statistics["data_docs"]` is the URL of this batch's Data Docs page.
    """
    frame = _gx_frame(text_validation.gx_safe(df, data_cfg))
    started = time.perf_counter()
    extra = change_expectations(data_cfg, profile)
    result = run_suite(
        frame,
        suite_file,
        extra,
        project=gx_project,
        run_name=batch_id,
        parameters=change_parameters(data_cfg, profile),
        keep_results=data_cfg.data_docs_keep,
        store=shared_store(data_cfg.gx_store) if gx_project is not None else None,
    )
    elapsed = time.perf_counter() - started
    found = messages.failures_from_result(result, frame, data_cfg)
    found += _extra_columns(df, data_cfg)
    found += text_validation.text_failures(df, data_cfg)
    failures = [f for f in found if f.severity == "critical"]
    warnings = [f for f in found if f.severity != "critical"]
    stats = messages.batch_statistics(frame, data_cfg)
    stats.update(gx=result.get("statistics", {}), seconds=round(elapsed, 3), suite=str(suite_file))
    if result.get("data_docs_url"):
        stats["data_docs"] = result["data_docs_url"]
    if not failures:  # change checks need clean numbers to mean anything
        _change_checks(frame, data_cfg, profile, reference, failures, warnings, stats)
    report = ValidationReport(batch_id, not failures, len(frame), failures, stats, None, warnings)
    report.gx_result = messages.compact_result(result)
    log.info("%s (GX %.2fs)", report.headline(), elapsed)
    return report


def _extra_columns(df: pd.DataFrame, data_cfg: DataConfig) -> list[Failure]:
    """Columns in the files that the config does not know: a renamed or added column."""
    in_files = set(df.attrs.get(COLUMNS_IN_FILES_ATTR, ()))
    extra = sorted(in_files - set(data_columns(data_cfg)) - {SOURCE_COLUMN})
    if not extra or data_cfg.extra_columns == "ignore":
        return []
    message = (
        f"the files hold columns the config does not list: {extra[:10]} — add them to "
        "data.features, fix the export, or set data.extra_columns: ignore"
    )
    return [Failure("expect_table_columns_to_match_set", None, len(extra), extra[:5], message)]


def _change_checks(
    frame: pd.DataFrame,
    data_cfg: DataConfig,
    profile: DataProfile | None,
    reference: pd.DataFrame | None,
    failures: list[Failure],
    warnings: list[Failure],
    stats: dict[str, Any],
) -> None:
    """Gross breakage (blocks by default), class mix and KS/PSI drift (inform by default)."""
    change = data_cfg.change
    if profile is not None and not profile.empty and data_cfg.features:
        rule = GrossChangeRule(
            change.gross_range_factor, change.gross_value_share, change.gross_displaced_share
        )
        verdict = gross_change(frame, profile, data_cfg.features, rule)
        stats["gross_change"] = {"displaced": verdict.displaced, "n_features": verdict.n_features}
        if verdict.broken and change.gross_change:
            failures.append(
                Failure("gross_change", None, len(verdict.displaced), [], verdict.message())
            )
        mix = class_mix_change(frame, profile, data_cfg.label)
        stats["class_mix"] = mix
        if mix["new_classes"] or mix["total_variation"] >= change.class_mix_threshold:
            message = (
                f"class mix changed: total variation {mix['total_variation']:.2f} from the "
                f"accepted data; classes never accepted before: {mix['new_classes'] or 'none'}"
            )
            target = failures if "class_mix" in change.block else warnings
            severity = "critical" if target is failures else "warning"
            target.append(Failure("class_mix", data_cfg.label, None, [], message, severity))
    if reference is not None and len(reference) and data_cfg.text in reference.columns:
        stats["text_change"] = text_validation.text_change(frame, reference, str(data_cfg.text))
        for finding in text_validation.text_change_failures(stats["text_change"], data_cfg):
            (failures if finding.severity == "critical" else warnings).append(finding)
    if reference is not None and len(reference) and data_cfg.features:
        drift = drift_report(
            reference, frame, list(data_cfg.features), psi_threshold=change.drift_psi
        )
        stats["drift"] = {
            "n_drifted": drift.n_drifted,
            "n_features": len(drift.features),
            "max_psi": drift.max_psi,
            "drifted": [f.feature for f in drift.features if f.drifted][:20],
        }
        if drift.n_drifted:
            message = (
                f"{drift.n_drifted} of {len(drift.features)} features drifted from the accepted "
                f"data (KS + PSI ≥ {change.drift_psi:g}; max PSI {drift.max_psi:.2f})"
            )
            target = failures if "drift" in change.block else warnings
            severity = "critical" if target is failures else "warning"
            target.append(Failure("drift", None, drift.n_drifted, [], message, severity))


def read_and_validate(
    zone: LandingZone,
    batch_id: str,
    data_cfg: DataConfig,
    suite_file: Path,
    *,
    profile: DataProfile | None = None,
    reference: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame | None, ValidationReport]:
    """Read a batch and validate it; a read error becomes a failed report (frame None).

    This is the ingest+validate step of every flow: invalid batches get a report, never an
    exception, so the caller can quarantine them.
    """
    try:
        frame = read_batch(zone, batch_id, data_cfg)
    except BatchReadError as error:
        report = ValidationReport.from_read_error(batch_id, error)
        log.warning(report.headline())
        return None, report
    report = validate_batch(
        frame, batch_id, data_cfg, suite_file, profile=profile, reference=reference
    )
    return frame, report


def save_report(report: ValidationReport, directory: Path) -> tuple[Path, Path]:
    """Write `<directory>/<batch_id>.json` and `.md` atomically; returns both paths."""
    stem = report.batch_id.replace("/", "_").replace(os.sep, "_")
    json_path, md_path = Path(directory) / f"{stem}.json", Path(directory) / f"{stem}.md"
    _atomic_write(json_path, report.to_json() + "\n")
    _atomic_write(md_path, report.summary())
    return json_path, md_path
