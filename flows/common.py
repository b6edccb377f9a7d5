"""The few lines every cadence flow starts and ends with."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import yaml
from prefect import get_run_logger

from data_plane.readers import use_system_arrow_pool
from evergreen.config import EvergreenConfig, config_from_dict, load_config
from evergreen.pending import NOTHING_PENDING
from flows.params import ConfigParams, FlowParams
from tasks import attempts
from tasks.ingest import BatchSelection
from tasks.limits import ensure_limits
from tasks.outcome import FlowOutcome
from tasks.promote import reconcile_registry
from tasks.staging import sweep_stale
from tasks.state import ModelState

if TYPE_CHECKING:
    from tasks.validate import PreparedData


class NoChampionError(RuntimeError):
    """A cadence that updates the champion ran before `bootstrap` registered one."""


def begin(params: ConfigParams) -> EvergreenConfig:
    """Load the run's config, make sure the concurrency limits exist on this Prefect API, remove
    staging folders killed runs left behind, record any champion move made outside evergreen,
    and record as `failed` the attempts that ended without a ledger entry (`tasks.attempts`).
    Arrow allocates through the C library's malloc from here on (`use_system_arrow_pool`)."""
    use_system_arrow_pool()
    cfg = run_config(params)
    cfg.home_path.mkdir(parents=True, exist_ok=True)
    removed = sweep_stale(cfg.home_path / "staging")
    if removed:
        get_run_logger().warning("removed staging folders left by killed runs: %s", removed)
    ensure_limits(cfg.registry.name)
    announce_trigger(getattr(params, "trigger", None))
    reconcile_registry(cfg)  # champion moves made by hand appear in the history first
    for line in attempts.reconcile(cfg):
        get_run_logger().warning("recorded an earlier attempt as failed: %s", line)
    return cfg


def trigger_details(trigger: str | None) -> dict[str, Any]:
    """The `trigger` parameter as a dict: the drift automation's JSON (evergreen.deployments.
    TRIGGER_TEMPLATE), or `{"note": text}` for free text an operator typed in the run form."""
    if not trigger or not trigger.strip():
        return {}
    try:
        value = json.loads(trigger)
    except json.JSONDecodeError:
        return {"note": trigger.strip()}
    return value if isinstance(value, dict) else {"note": trigger.strip()}


def announce_trigger(trigger: str | None) -> None:
    """Say in the run's log what started it, so the Prefect UI answers "why did this run?"."""
    details = trigger_details(trigger)
    if not details:
        return
    if "event" in details:
        facts = ", ".join(f"{k}={v}" for k, v in (details.get("details") or {}).items())
        get_run_logger().info(
            "started by %s (event %s at %s on %s): %s",
            details["event"],
            details.get("id"),
            details.get("occurred"),
            details.get("model"),
            facts or "no details",
        )
    else:
        get_run_logger().info("started by: %s", details["note"])


def run_config(params: ConfigParams) -> EvergreenConfig:
    """`config_path` if given, else the Prefect Variable `evergreen_config` (editable in the UI:
    a path, the YAML text, or a JSON object), else `load_config`'s own discovery."""
    if params.config_path is None:
        value = _config_variable()
        if isinstance(value, dict):
            return config_from_dict(value, params.overrides)
        if isinstance(value, str) and "\n" in value.strip():
            return config_from_dict(yaml.safe_load(value), params.overrides)
        if isinstance(value, str) and value.strip():
            return load_config(value.strip(), params.overrides)
    return load_config(params.config_path, params.overrides)


def _config_variable() -> object:
    from prefect.variables import Variable

    from evergreen.deployments import CONFIG_VARIABLE

    return Variable.get(CONFIG_VARIABLE, default=None)


def selection(params: FlowParams) -> BatchSelection:
    """The run's batch selection, from its parameters."""
    return BatchSelection(
        batch_ids=tuple(params.batch_ids) if params.batch_ids else None,
        until=params.until,
        max_batches=params.max_batches,
        force=params.force,
    )


def nothing_to_do(cadence: str) -> FlowOutcome:
    return FlowOutcome(cadence=cadence, decision="skipped", reasons=[NOTHING_PENDING])


def current_champion(cfg: EvergreenConfig) -> str | None:
    """The version the `champion` alias points to (None before bootstrap), without loading it."""
    from model_registry.registry import Registry
    from model_registry.versions import CHAMPION

    return Registry.from_config(cfg).aliases().get(CHAMPION)


def all_quarantined(cfg: EvergreenConfig, cadence: str, data: PreparedData) -> FlowOutcome:
    """Every batch failed validation: the champion stays (and the outcome names it, as every
    other outcome does); say so loudly and actionably."""
    return FlowOutcome(
        cadence=cadence,
        decision="quarantined",
        champion=current_champion(cfg),
        quarantined=dict(data.quarantined),
        verdict_keys=dict(data.verdict_keys),
        reasons=[
            f"batches {sorted(data.quarantined)} failed validation and were quarantined (files "
            f"untouched); see {_reports(cfg, cadence, sorted(data.quarantined))}, fix the files "
            "in place (the next run validates them again) or land them under a new batch_id"
        ],
    )


def _reports(cfg: EvergreenConfig, cadence: str, batch_ids: list[str], most: int = 3) -> str:
    """Where the validation reports of quarantined batches are: each file, or the folder."""
    folder = cfg.home_path / "reports" / "validation" / cadence
    if len(batch_ids) > most:
        return f"{folder}/<batch_id>.md"
    stems = (b.replace("/", "_").replace(os.sep, "_") for b in batch_ids)  # as save_report
    return ", ".join(str(folder / f"{stem}.md") for stem in stems)


def require_champion(
    champion: ModelState | None, cadence: str, cfg: EvergreenConfig | None = None
) -> ModelState:
    """The champion a cadence updates; with `cfg`, also checked against the config's classes
    and inputs (`check_matches_champion`) before the run commits anything to the memory."""
    if champion is None:
        raise NoChampionError(f"{cadence} needs a champion: run `evergreen run bootstrap` first")
    if cfg is not None:
        check_matches_champion(cfg, champion)
    return champion


def check_matches_champion(cfg: EvergreenConfig, champion: ModelState) -> None:
    """A model's classes and inputs (columns; a text model's `model.max_length`) are fixed when
    its first champion is trained: a config that changed them (a class added to data.classes,
    a feature renamed) would accept rows the champion cannot learn, put them in the data
    memory, and fail every later run on them. Order does not matter (the model reads its own
    spec's order).

    Raises:
        ConfigError: the config's classes, input columns or text width differ from the
            champion's.
    """
    from continual.models import CAUSAL_LM, TEXT_FAMILIES
    from data_plane.profile import label_key
    from evergreen.errors import ConfigError

    spec = champion.spec
    problems = []
    mine, its = (sorted({label_key(c) for c in cs}) for cs in (cfg.data.classes, spec.classes))
    # a causal LM has no classes (the config's one placeholder class is not the model's)
    if spec.family != CAUSAL_LM and mine != its:
        problems.append(f"data.classes {list(cfg.data.classes)} (champion: {list(spec.classes)})")
    key, columns = (
        ("data.text", [str(cfg.data.text)])
        if cfg.data.text
        else ("data.features", cfg.data.features)
    )
    # a spec without column names (a version saved before they were recorded) reads by position
    if spec.feature_columns and sorted(columns) != sorted(spec.feature_columns):
        problems.append(f"{key} {list(columns)} (champion: {list(spec.feature_columns)})")
    # a text model's input width: its token ids and the replay buffer's are max_length wide
    if cfg.data.text and spec.family in TEXT_FAMILIES and cfg.model.max_length != spec.n_features:
        problems.append(f"model.max_length {cfg.model.max_length} (champion: {spec.n_features})")
    if problems:
        raise ConfigError(
            f"the config does not match champion v{champion.version}: {'; '.join(problems)}. A "
            "model's classes and inputs are fixed when its first champion is trained: put the "
            "config back, or start a new model (another registry.name, or a new home) with "
            "`evergreen run bootstrap`"
        )
