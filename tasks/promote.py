"""Register the challenger and promote it (compare-and-set) or reject it; record everything."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from continual.checkpoint import load_checkpoint
from continual.gate_policy import GateDecision
from continual.inference import predict_logits
from evergreen.config import EvergreenConfig
from model_registry.fault_hooks import hang_here
from model_registry.reconcile import ABANDONED, DECISION_TAG, clear_abandoned, reconcile_champion
from model_registry.registry import IDEMPOTENCY_TAG, Registry
from model_registry.run_log import records_experiment
from model_registry.versions import ArtifactIntegrityError, VersionInfo
from tasks import attempts, ledger
from tasks.common import current_flow_run_id, frame_to_tensors, git_commit
from tasks.evaluate import Evaluation
from tasks.events import emit
from tasks.limits import promotion_slot
from tasks.outcome import Decision, FlowOutcome
from tasks.resume import discard_states
from tasks.run_log import run_logger
from tasks.staging import owned
from tasks.state import ModelState, staging_dir, write_state
from tasks.tracking import run_record
from tasks.validate import PreparedData
from tasks.version_cache import load_cached, prune_after_use


@task(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2), cache_policy=NO_CACHE)
def load_champion(cfg: EvergreenConfig) -> ModelState | None:
    """Download and load the current champion (integrity-checked), or None before bootstrap."""
    registry = Registry.from_config(cfg)
    champion = registry.champion()
    if champion is None:
        return None
    state = load_cached(cfg, registry, champion.version)
    prune_after_use(cfg, registry, [champion.version])
    return state


@dataclass(frozen=True)
class Registration:
    """What a flow hands to registration and promotion: the challenger and its evidence."""

    cadence: str
    method: str
    challenger: ModelState
    parent: ModelState | None
    decision: GateDecision
    batch_ids: tuple[str, ...] = ()
    data_hash: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    reports: dict[str, Path] = field(default_factory=dict)
    check_rows: pd.DataFrame | None = None  # rows the reloaded checkpoint must reproduce
    quarantined: dict[str, str] = field(default_factory=dict)
    verdict_keys: dict[str, dict[str, str]] = field(default_factory=dict)  # quarantined batches
    evaluation: Evaluation | None = None  # datasets and per-class reports for the run
    train_rows: pd.DataFrame | None = None  # this run's accepted train rows
    data_docs: dict[str, str] = field(default_factory=dict)  # batch id → Data Docs page
    trigger: str | None = None  # what started the run (the drift event's JSON), if anything


def lineage_tags(reg: Registration) -> dict[str, str]:
    parent = reg.parent
    return {
        "parent_version": parent.version if parent and parent.version else "none",
        "cadence": reg.cadence,
        "method": reg.method,
        "batch_ids": ",".join(reg.batch_ids),
        "data_hash": reg.data_hash or "none",
        "memory_run": reg.challenger.memory_run or "none",
        "git_commit": git_commit(),
        "flow_run_id": current_flow_run_id(),
        "gate_decision": "pass" if reg.decision.promote else "fail",
        "gate_metrics": json.dumps(reg.decision.to_metrics(), sort_keys=True)[:4900],
        "trigger": (reg.trigger or "schedule or manual")[:4900],
    }


def registration_for(
    cadence: str,
    method: str,
    evaluation: Evaluation,
    parent: ModelState | None,
    data: PreparedData | None = None,
    metrics: dict[str, float] | None = None,
    *,
    trigger: str | None = None,
) -> Registration:
    """The registration of an evaluated challenger (data None: a merge, no new batches);
    `trigger` is the run's `trigger` parameter (tag `evergreen.trigger`)."""
    return Registration(
        cadence=cadence,
        method=method,
        challenger=evaluation.challenger,
        parent=parent,
        decision=evaluation.decision,
        batch_ids=tuple(data.batch_ids) if data else (),
        data_hash=data.data_hash if data else "",
        metrics={**(data.drift if data else {}), **(metrics or {})},
        reports=dict(data.reports) if data else {},
        check_rows=evaluation.rows,
        quarantined=dict(data.quarantined) if data else {},
        verdict_keys=dict(data.verdict_keys) if data else {},
        evaluation=evaluation,
        train_rows=data.train if data else None,
        data_docs=dict(data.data_docs) if data else {},
        trigger=trigger,
    )


def idempotency_key(reg: Registration, flow_run_id: str) -> str | None:
    """The key that makes registration idempotent: flow run + cadence + data hash (+ batches).

    A Prefect retry (task or flow) keeps the flow-run id, so a retry after the version was
    created finds it instead of registering a second one. Outside a flow run ("local") there is
    nothing that identifies a retry, so there is no key.
    """
    if not flow_run_id or flow_run_id == "local":
        return None
    facts = [flow_run_id, reg.cadence, reg.data_hash or "none", ",".join(reg.batch_ids)]
    return hashlib.sha256("\n".join(facts).encode()).hexdigest()[:32]


@task(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2), cache_policy=NO_CACHE)
def register_challenger(cfg: EvergreenConfig, reg: Registration, staging: Path) -> VersionInfo:
    """Log the challenger as a model version (alias `challenger`) with lineage and gate metrics;
    a retry of the same flow run reuses the version its earlier attempt registered."""
    registry = Registry.from_config(cfg)
    key = idempotency_key(reg, current_flow_run_id())
    existing = registry.find_version(IDEMPOTENCY_TAG, key) if key else None
    if existing is not None:
        registry.set_challenger(existing.version)
        return existing
    checkpoint = staging / "checkpoint"
    hang_here("promote.before-checkpoint")  # test hook: trained and gated, nothing written yet
    if not checkpoint.exists():
        parent = reg.parent.origin if reg.parent is not None else None
        write_state(reg.challenger, checkpoint, parent=parent)
    verify_round_trip(cfg, reg.challenger, checkpoint, reg.check_rows)
    gate_file = staging / "gate.json"
    gate_file.write_text(json.dumps(reg.decision.to_dict(), indent=2, default=str))
    info = registry.log_version(
        checkpoint,
        lineage=lineage_tags(reg),
        metrics=reg.metrics,  # the gate's metrics go with the record, linked to the model
        params={"cadence": reg.cadence, "method": reg.method},
        run_name=f"{reg.cadence}-{reg.batch_ids[-1] if reg.batch_ids else 'merge'}",
        reports={"gate.json": gate_file, **reg.reports},
        record=run_record(cfg, reg),
        idempotency_key=key,
    )
    registry.set_challenger(info.version)
    hang_here("promote.challenger-set")  # test hook: registered, not yet promoted or rejected
    return info


def verify_round_trip(
    cfg: EvergreenConfig, challenger: ModelState, checkpoint: Path, rows: pd.DataFrame | None
) -> None:
    """The checkpoint that will be served must predict exactly what the gate evaluated.

    Raises:
        RuntimeError: the reloaded model's logits differ from the in-memory challenger's.
    """
    if rows is None or rows.empty:
        return
    sample = rows.head(64)
    X, _ = frame_to_tensors(sample, challenger.spec, cfg.data.label)
    expected = predict_logits(challenger.model, X)
    reloaded = predict_logits(load_checkpoint(checkpoint)[0], X)
    gap = float((expected - reloaded).abs().max())
    if gap > 1e-4:
        raise RuntimeError(
            f"the saved checkpoint does not reproduce the evaluated challenger (max logit gap "
            f"{gap:.2e}); nothing was registered"
        )


@task(cache_policy=NO_CACHE)
def promote_or_reject(cfg: EvergreenConfig, reg: Registration, version: VersionInfo) -> FlowOutcome:
    """Compare-and-set promotion if the gate passed; otherwise the champion stays and the
    `challenger` alias is removed (it marks only the candidate under evaluation)."""
    registry = Registry.from_config(cfg)
    reasons = list(reg.decision.reasons)
    promoted = False
    try:
        if reg.decision.promote:
            promoted = _promote(registry, reg, version, reasons)
        outcome: Decision = "promoted" if promoted else "rejected"
        registry.set_version_tags(version.version, {"evergreen.decision": outcome})
    finally:
        if not promoted:  # rejected, stale, tampered or crashed: no longer under evaluation
            registry.clear_challenger(version.version)
    champion = registry.champion()
    return FlowOutcome(
        cadence=reg.cadence,
        decision=outcome,
        batch_ids=list(reg.batch_ids),
        version=version.version,
        champion=champion.version if champion else None,
        reasons=reasons,
        metrics={**reg.decision.to_metrics(), **reg.metrics},
        quarantined=dict(reg.quarantined),
        verdict_keys=dict(reg.verdict_keys),
    )


def _promote(
    registry: Registry, reg: Registration, version: VersionInfo, reasons: list[str]
) -> bool:
    """Promote `version` (CAS against the champion it was evaluated with); reasons get why not.

    A version that already is the champion was promoted by an earlier attempt of this flow run
    (versions are registered once per run, see `idempotency_key`): a retry reports it promoted.
    """
    expected = reg.parent.version if reg.parent else None
    champion = registry.champion()
    if champion is not None and champion.version == version.version:
        return True
    try:
        with promotion_slot(registry.model_name):
            result = registry.promote(
                version.version,
                expected_champion=expected,
                reason=f"{reg.cadence}: " + " ".join(reasons),  # whole sentences (5000 chars)
                actor=f"flow:{reg.cadence}",
                flow_run_id=current_flow_run_id(),
            )
    except ArtifactIntegrityError as error:  # tampered/corrupt artifacts: never served
        reasons.append(f"not promoted: {error}")
        return False
    if not result.promoted:
        reasons.append(result.reason)
    return result.promoted


@task(cache_policy=NO_CACHE)
def reconcile_registry(cfg: EvergreenConfig) -> None:
    """Record champion moves made outside evergreen (MLflow UI/API); an ungated one is an error
    in the run's log (the history says UNGATED; `evergreen rollback` undoes it); then clear
    what a run killed during registration left (`clear_abandoned`)."""
    registry = Registry.from_config(cfg)
    found = reconcile_champion(registry)
    log = get_run_logger()
    if found.event is not None:
        (log.error if found.ungated else log.warning)("registry: %s", found.event.reason)
    experiment = cfg.registry.experiment
    cleanup = clear_abandoned(registry, [experiment, records_experiment(experiment)])
    if cleanup.challenger:
        log.warning(
            "registry: removed alias challenger from v%s, left by a run that never decided on "
            "it (tagged %s=%s)",
            cleanup.challenger,
            DECISION_TAG,
            ABANDONED,
        )
    if cleanup.killed_runs:
        log.warning(
            "registry: marked %d MLflow run(s) left RUNNING by killed runs as KILLED: %s",
            len(cleanup.killed_runs),
            ", ".join(cleanup.killed_runs),
        )


@task(cache_policy=NO_CACHE)
def roll_back(cfg: EvergreenConfig, *, to: str | None, reason: str) -> FlowOutcome:
    """Move `champion` back (to `to`, or the champion the current one replaced)."""
    registry = Registry.from_config(cfg)
    with promotion_slot(registry.model_name):
        result = registry.rollback(
            to=to, reason=reason, actor="flow:rollback", flow_run_id=current_flow_run_id()
        )
    if result.promoted:
        emit(
            "evergreen.model.rolled-back",
            cfg,
            {"version": result.version, "previous": result.previous, "reason": reason},
        )
    return FlowOutcome(
        cadence="rollback",
        decision="rolled-back" if result.promoted else "skipped",
        version=result.version,
        champion=result.version if result.promoted else result.previous,
        reasons=[result.reason],
    )


def discarded_update(
    cadence: str,
    champion: ModelState,
    data: PreparedData,
    check: GateDecision,
) -> FlowOutcome:
    """An update its own selection check discarded: nothing registered, the batches recorded
    as rejected (their rows stay in the data memory for the next update)."""
    outcome = FlowOutcome(
        cadence=cadence,
        decision="rejected",
        batch_ids=list(data.batch_ids),
        champion=champion.version,
        quarantined=dict(data.quarantined),
        verdict_keys=dict(data.verdict_keys),
        reasons=[
            "the update was discarded on its select rows (adapter restored, no version "
            "registered):",
            *check.reasons,
        ],
        metrics=select_metrics(check),
    )
    return outcome


def select_metrics(check: GateDecision) -> dict[str, float]:
    """A daily's select-row check as run metrics ("select.promote", "select.new.lcb", …), on
    the registered version's run when the adapter was kept and on the ledger when not."""
    return {f"select.{k.removeprefix('gate.')}": v for k, v in check.to_metrics().items()}


@contextmanager
def challenger_workspace(
    cfg: EvergreenConfig, cadence: str, batch_ids: list[str]
) -> Iterator[Path]:
    """A staging folder for the challenger, removed afterwards whatever happens, as is the
    cadence's saved training state (`tasks.resume`) — except after a run that was killed or
    stopped at its time limit (`train.timeout_minutes`): the next run on the same inputs resumes
    that state, so a fit longer than the limit still finishes over a few runs instead of starting
    over (and timing out) every time.

    If training, evaluation or registration raises, the batches are recorded as `failed` in the
    ledger (with the error) before the exception propagates: the flow run fails visibly, nothing
    was promoted, and the batches stay pending for the next run. An attempt marker written first
    (`tasks.attempts`) lets the next run record `failed` for a run that was killed or could not
    write the entry itself.
    """
    attempts.begin(cfg, cadence, batch_ids)  # a run that cannot record its end is recorded later
    staging = staging_dir(cfg, cadence)
    timed_out = False
    try:
        with owned(staging):  # a run killed before `finally` leaves it to `sweep_stale`
            yield staging
    except Exception as error:
        timed_out = isinstance(error, TimeoutError)
        try:
            ledger.record_failed(cfg, cadence, batch_ids, repr(error))
        except Exception:  # e.g. the disk is full: the next run records it from the marker
            attempts.unrecorded(cfg, cadence, error)
            raise
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if timed_out:
            _log_kept_state(cadence)
        else:
            discard_states(cfg, cadence)  # the run ended: its training state is never resumed


def _log_kept_state(cadence: str) -> None:
    run_logger(__name__).warning(
        "%s timed out: its training state is kept, and the next run on the same batches, "
        "champion and config resumes it (raise train.timeout_minutes to finish in one run)",
        cadence,
    )
