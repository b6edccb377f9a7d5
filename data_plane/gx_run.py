"""Running the suite: one GX context and Checkpoint per process, Data Docs kept bounded.

Apart from the suite (`data_plane.gx_suite`) because this is GX's costly, stateful side: the
context is opened once per process and project (GX starts slowly), a Checkpoint is created once
per suite content (registering one costs ~0.1 s, updating one in place seconds), and in a
file-backed project (`<home>/gx/`) each run stores its validation result and adds the batch's
page to the Data Docs site, whose history is kept to the newest `data.data_docs_keep` results.
With `data.gx_store` (S3) the project is pulled before a run and pushed after
(`data_plane.gx_store` says why a sync). Flows of several cadences may add the same item to one
file-backed context at once: threads of one process and processes of one host take turns
(`gx_suite.gx_lock`); `_get_or_add` still reads an item another host stored meanwhile.
"""

from __future__ import annotations

import functools
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from data_plane.gx_store import S3GxStore
from data_plane.gx_suite import GX_FOLDER, gx_lock, load_suite, parse_suite

# BASIC, not SUMMARY: SUMMARY adds two metrics per column check (the unexpected rows' index list
# and query), a fifth of the validation's time; the messages find a failure's rows in the frame
# themselves (`messages.unexpected_rows`), and the sample values and counts come with BASIC.
RESULT_FORMAT = {"result_format": "BASIC", "partial_unexpected_count": 10}


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
        suite = parse_suite(text, Path(suite_file))
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
    with gx_lock(project):
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
