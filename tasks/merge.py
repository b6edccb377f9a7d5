"""Merging and consolidation challengers: Fisher-weighted merge and lineage EMA/interpolation."""

from __future__ import annotations

import copy
import dataclasses

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from torch import Tensor

from continual.ewc import EWC
from continual.fisher import diagonal_fisher
from continual.merging import (
    average,
    ema_over_lineage,
    fisher_merge,
    linear_interpolate,
    parameter_distance,
)
from continual.models import ModelSpec, build_model
from continual.standardization import (
    MEAN_KEY,
    STD_KEY,
    Widening,
    align_for_merge,
    folds_exactly,
    rescale_fisher,
)
from evergreen.config import EvergreenConfig
from model_registry.registry import Registry
from tasks.memory import DataMemory
from tasks.state import ModelState, make_trainable, parameters_of
from tasks.train import fisher_kind, fisher_rows
from tasks.version_cache import load_cached, prune_after_use


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def load_versions(cfg: EvergreenConfig, versions: list[str]) -> list[ModelState]:
    """Download (integrity-checked) and load several registered versions."""
    registry = Registry.from_config(cfg)
    states = [load_cached(cfg, registry, version) for version in versions]
    prune_after_use(cfg, registry, versions)
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


def _own_fisher(state: ModelState, memory: DataMemory) -> dict[str, Tensor]:
    """The parent's own Fisher (from its own training data), as the method guide requires:
    the online accumulator γF_old + F_new counts the shared ancestry twice and drags the merge
    to the newest parent. Versions from before own Fishers were stored fall back to the Fisher
    on the replay buffer's training rows (never on held-out rows), of the family's kind and on
    the family's rows (`fisher_kind`, `fisher_rows`), on a trainable copy: a loaded version's
    parameters may be frozen (a folded LoRA version's are), and the Fisher covers only what
    training may change (`make_trainable`), as a stored own Fisher does."""
    own: dict[str, Tensor] | None = state.ewc.own_fisher if state.ewc is not None else None
    if own:
        return own
    if memory.buffer is None or len(memory.buffer) == 0:
        raise ValueError(f"v{state.version} has no own Fisher and the data memory holds no rows")
    get_run_logger().warning("v%s has no own Fisher: estimating it on replay rows", state.version)
    X, y, _ = memory.buffer.tensors()
    model = make_trainable(copy.deepcopy(state.model))
    return diagonal_fisher(model, *fisher_rows(state.spec, X, y), kind=fisher_kind(state.spec))


def _warn_if_approximate(exact: bool) -> None:
    if not exact:
        get_run_logger().warning(
            "the versions widened different features and this model family cannot re-express "
            "them exactly in one standardisation: merged with the widest std (the gate decides)"
        )


def _spec_of(spec: ModelSpec, merged: dict[str, Tensor]) -> ModelSpec:
    """The spec with the standardisation the merged weights use (`align_for_merge`)."""
    if MEAN_KEY not in merged or STD_KEY not in merged:
        return spec
    return dataclasses.replace(
        spec, input_mean=merged[MEAN_KEY].tolist(), input_std=merged[STD_KEY].tolist()
    )


def _fisher_in_merged_coordinates(
    champion: ModelState, merged: dict[str, Tensor]
) -> dict[str, Tensor]:
    """The champion's EWC Fisher as the merged weights read it: where the merge widened a
    feature's std (`align_for_merge`), a first-layer weight sees inputs s_champion/s_merged
    times smaller, so its Fisher entry scales by that ratio squared — the same rewrite a
    weekly update's widening applies (`rescale_fisher`)."""
    if champion.ewc is None:
        raise ValueError(f"v{champion.version} has no EWC state to anchor the merge with")
    fisher = champion.ewc.fisher
    new_std = merged.get(STD_KEY)
    old_std = dict(champion.model.named_buffers()).get(STD_KEY)
    if new_std is None or old_std is None or not folds_exactly(merged):
        return fisher  # no standardisation, or weights not rewritten (approximate alignment)
    if torch.equal(new_std, old_std.to(new_std.device, new_std.dtype)):
        return fisher
    old_std = old_std.to(new_std.device, new_std.dtype)
    features = torch.nonzero(new_std != old_std).flatten().tolist()
    return rescale_fisher(fisher, Widening(features, old_std, new_std))


def _with_weights(base: ModelState, merged: dict[str, Tensor], champion: ModelState) -> ModelState:
    """A merged challenger: new weights; EWC anchored at them; the champion's learned batches
    and references (a merge learns no new data)."""
    spec = _spec_of(base.spec, merged)
    model = build_model(spec)
    model.load_state_dict(merged)
    model.eval()
    ewc = None
    if champion.ewc is not None:
        ewc = EWC(
            _fisher_in_merged_coordinates(champion, merged),
            parameters_of(model),
            lam=champion.ewc.lam,
            gamma=champion.ewc.gamma,
            kind=champion.ewc.kind,
        )
    return ModelState(
        model=model,
        spec=spec,
        ewc=ewc,
        learned=champion.learned,
        references=dict(champion.references),
        memory_run=champion.memory_run,
    )


@task(cache_policy=NO_CACHE, timeout_seconds=1800)
def merge_models(
    cfg: EvergreenConfig,
    states: list[ModelState],
    champion: ModelState,
    memory: DataMemory,
    eps: float = 1e-8,
    method: str = "fisher",
) -> tuple[ModelState, dict[str, float]]:
    """ "fisher": θ = Σ F_k θ_k / Σ F_k per parameter with each parent's own Fisher; "linear":
    the plain mean. Reports how far apart the parents were.

    Parents are full weights (a LoRA version is loaded folded, W₀ + ΔW_k), so on a shared base
    this merges the adapters' ΔW: Σ F_k (W₀ + ΔW_k) / Σ F_k = W₀ + Σ F_k ΔW_k / Σ F_k, with F_k
    the Fisher of W at the folded weights on k's own data (`continual.merging.merge_lora_deltas`).
    """
    if method not in ("fisher", "linear"):
        raise ValueError(f"merge method {method!r}: expected 'fisher' or 'linear'")
    fishers = [_own_fisher(s, memory) for s in states] if method == "fisher" else None
    # Versions that widened different features are first re-expressed in one standardisation.
    dicts, aligned, exact = align_for_merge([s.model.state_dict() for s in states], fishers)
    _warn_if_approximate(exact)
    merged = average(dicts) if fishers is None else fisher_merge(dicts, aligned or fishers, eps=eps)
    distances = {
        f"merge.distance.v{s.version}": parameter_distance(d, merged)
        for s, d in zip(states, dicts, strict=True)
    }
    get_run_logger().info(
        "%s merge of %s; distances %s", method, [s.version for s in states], distances
    )
    return _with_weights(states[0], merged, champion), distances


@task(cache_policy=NO_CACHE, timeout_seconds=1800)
def consolidate_lineage(
    cfg: EvergreenConfig, lineage: list[ModelState], champion: ModelState
) -> tuple[ModelState, dict[str, float]]:
    """EMA over the lineage (oldest first) or interpolation of champion and its parent."""
    c = cfg.consolidate
    dicts, _, exact = align_for_merge([s.model.state_dict() for s in lineage])
    _warn_if_approximate(exact)
    if c.mode == "ema":
        merged = ema_over_lineage(dicts, c.decay)
    else:
        merged = linear_interpolate(dicts[-1], dicts[-2], c.alpha)
    distance = parameter_distance(merged, dicts[-1])
    return _with_weights(lineage[-1], merged, champion), {"consolidate.distance": distance}
