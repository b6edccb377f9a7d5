"""Merging and consolidation challengers: Fisher-weighted merge and lineage EMA/interpolation."""

from __future__ import annotations

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from continual.ewc import EWC, diagonal_fisher
from continual.merging import ema_over_lineage, fisher_merge, linear_interpolate, parameter_distance
from continual.models import build_model
from evergreen.config import EvergreenConfig
from model_registry.registry import Registry
from tasks.common import frame_to_tensors
from tasks.state import ModelState, parameters_of, read_state


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def load_versions(cfg: EvergreenConfig, versions: list[str]) -> list[ModelState]:
    """Download (integrity-checked) and load several registered versions."""
    registry = Registry.from_config(cfg)
    states = []
    for version in versions:
        target = cfg.home_path / "cache" / "versions" / version
        if not target.exists():
            registry.download(version, target)
        states.append(read_state(target, version=version))
    if len({(s.spec.family, s.spec.n_features, s.spec.n_classes) for s in states}) != 1:
        raise ValueError(f"versions {versions} have different architectures and cannot be merged")
    return states


def lineage_versions(cfg: EvergreenConfig, count: int) -> list[str]:
    """The most recent distinct champions, oldest first (from the promotion history)."""
    seen: list[str] = []
    for event in Registry.from_config(cfg).history(limit=200):
        if event.version not in seen:
            seen.append(event.version)
        if len(seen) == count:
            break
    return list(reversed(seen))


def _fisher_of(cfg, state: ModelState, reference: pd.DataFrame) -> dict:
    if state.ewc is not None:
        return state.ewc.fisher
    X, y = frame_to_tensors(reference, state.spec, cfg.data.label)
    return diagonal_fisher(state.model, X, y)


def _with_weights(base: ModelState, merged: dict, champion: ModelState) -> ModelState:
    model = build_model(base.spec)
    model.load_state_dict(merged)
    model.eval()
    ewc = None
    if champion.ewc is not None:
        ewc = EWC(
            champion.ewc.fisher,
            parameters_of(model),
            lam=champion.ewc.lam,
            gamma=champion.ewc.gamma,
        )
    return ModelState(
        model=model, spec=base.spec, ewc=ewc, buffer=champion.buffer, retention=champion.retention
    )


@task(cache_policy=NO_CACHE, timeout_seconds=1800)
def fisher_merge_models(
    cfg: EvergreenConfig, states: list[ModelState], champion: ModelState, eps: float = 1e-8
) -> tuple[ModelState, dict[str, float]]:
    """θ = Σ F_k θ_k / Σ F_k per parameter; reports how far apart the parents were."""
    reference = champion.retention
    fishers = [_fisher_of(cfg, s, reference) for s in states]
    merged = fisher_merge([s.model.state_dict() for s in states], fishers, eps=eps)
    distances = {
        f"merge.distance.v{s.version}": parameter_distance(s.model.state_dict(), merged)
        for s in states
    }
    get_run_logger().info(
        "Fisher merge of %s; distances %s", [s.version for s in states], distances
    )
    return _with_weights(states[0], merged, champion), distances


@task(cache_policy=NO_CACHE, timeout_seconds=1800)
def consolidate_lineage(cfg: EvergreenConfig, lineage: list[ModelState], champion: ModelState):
    """EMA over the lineage (oldest first) or interpolation of champion and its parent."""
    c = cfg.consolidate
    dicts = [s.model.state_dict() for s in lineage]
    if c.mode == "ema":
        merged = ema_over_lineage(dicts, c.decay)
    else:
        merged = linear_interpolate(dicts[-1], dicts[-2], c.alpha)
    distance = parameter_distance(merged, dicts[-1])
    return _with_weights(lineage[-1], merged, champion), {"consolidate.distance": distance}


def retention_slices(retention: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows of the latest batch, all rows): the "new data" and "retention" views of a merge gate."""
    latest = retention["batch_id"].max()
    return retention[retention["batch_id"] == latest], retention
