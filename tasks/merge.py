"""Merging and consolidation challengers: Fisher-weighted, linear, TIES and DARE merges, and
lineage EMA/interpolation."""

from __future__ import annotations

import copy
import dataclasses
from typing import cast

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
    zero_filled,
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
from continual.task_merging import DEFAULT_DENSITY, TASK_METHODS, TaskMethod, task_merge
from evergreen.config import EvergreenConfig
from evergreen.errors import UsageError
from model_registry.registry import Registry, UnknownVersionError
from model_registry.versions import RegistryError
from tasks.memory import DataMemory
from tasks.state import ModelState, make_trainable, parameters_of
from tasks.train import fisher_kind, fisher_rows
from tasks.version_cache import load_cached, prune_after_use


def require_versions(cfg: EvergreenConfig, versions: list[str]) -> None:
    """Every version `--versions` names exists: a typo is a usage error (exit 2) said at once,
    not a registry failure after the download task's retries.

    Raises:
        UnknownVersionError: a named version is not registered.
    """
    registry = Registry.from_config(cfg)
    for version in versions:
        try:
            registry.get_version(version)
        except RegistryError as exc:
            raise UnknownVersionError(f"--versions: {exc}") from None


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def load_versions(cfg: EvergreenConfig, versions: list[str]) -> list[ModelState]:
    """Download (integrity-checked) and load several registered versions."""
    registry = Registry.from_config(cfg)
    states = [load_cached(cfg, registry, version) for version in versions]
    prune_after_use(cfg, registry, versions)
    if len({(s.spec.family, s.spec.n_features, s.spec.n_classes) for s in states}) != 1:
        raise UsageError(f"versions {versions} have different architectures and cannot be merged")
    return states


MAX_ANCESTRY = 500  # parent links followed per version when looking for a common ancestor
_NO_PARENT = ("", "none")


def ancestry(registry: Registry, version: str) -> list[str]:
    """The versions `version`'s weights descend from, nearest first, from the registry's
    `evergreen.parent_version` tags. A bootstrap version is trained from scratch, so its tag (the
    champion a forced bootstrap replaced) is not a weight ancestor and the walk stops there."""
    chain: list[str] = []
    current = str(version)
    for _ in range(MAX_ANCESTRY):
        tags = registry.get_version(current).tags
        if tags.get("evergreen.cadence") == "bootstrap":
            break
        parent = tags.get("evergreen.parent_version", "none")
        if parent in _NO_PARENT or parent in chain or parent == str(version):
            break
        chain.append(parent)
        current = parent
    return chain


def common_ancestor(registry: Registry, versions: list[str]) -> str:
    """The nearest version that every one of `versions` descends from (a strict ancestor of
    each: a version is not its own ancestor, so merging v2 with its child v3 uses v2's parent).

    Raises:
        UsageError: no such version (a usage error: another method or other versions); the
            message gives each version's ancestry.
    """
    chains = {str(v): ancestry(registry, str(v)) for v in versions}
    first = chains[str(versions[0])]
    for candidate in first:
        if all(candidate in chain for chain in chains.values()):
            return candidate
    lines = "; ".join(
        f"v{v}: {' → '.join('v' + a for a in chain) or 'none (trained from scratch)'}"
        for v, chain in chains.items()
    )
    raise UsageError(
        f"versions {list(chains)} share no registered ancestor, and TIES/DARE merge task "
        f"vectors θ_v − θ_ancestor (ancestry: {lines}). Merge versions trained from a common "
        "registered version, or use --method fisher or linear"
    )


@task(cache_policy=NO_CACHE)
def find_ancestor(cfg: EvergreenConfig, versions: list[str]) -> str:
    """The versions' nearest common ancestor (`common_ancestor`). Not retried: a refusal is an
    answer about the lineage, which a retry would only repeat (MLflow's client retries
    transient HTTP errors itself)."""
    ancestor = common_ancestor(Registry.from_config(cfg), versions)
    get_run_logger().info("common ancestor of %s: v%s", versions, ancestor)
    return ancestor


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
    training may change (`make_trainable`), as a stored own Fisher does. A daily LoRA
    version's own Fisher covers only the parameters it changed; `merge_models` reads the others
    as zero importance (`continual.merging.zero_filled`)."""
    own: dict[str, Tensor] | None = state.ewc.own_fisher if state.ewc is not None else None
    if own is not None:  # may cover only what the version changed (`merge_models`)
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


MERGE_METHODS = ("fisher", "linear", *TASK_METHODS)


@task(cache_policy=NO_CACHE, timeout_seconds=1800)
def merge_models(
    cfg: EvergreenConfig,
    states: list[ModelState],
    champion: ModelState,
    memory: DataMemory,
    eps: float = 1e-8,
    method: str = "fisher",
    *,
    ancestor: ModelState | None = None,
    density: float | None = None,
    seed: int = 0,
) -> tuple[ModelState, dict[str, float]]:
    """ "fisher": θ = Σ F_k θ_k / Σ F_k per parameter with each parent's own Fisher; "linear":
    the plain mean; "ties", "dare", "dare_ties": θ_ancestor + the TIES/DARE merge of the task
    vectors θ_k − θ_ancestor (`continual.task_merging`; `density` None: the method's default,
    `seed` seeds DARE's drop). Reports how far apart the parents were.

    Parents are full weights (a LoRA version is loaded folded, W₀ + ΔW_k), so on a shared base
    this merges the adapters' ΔW: Σ F_k (W₀ + ΔW_k) / Σ F_k = W₀ + Σ F_k ΔW_k / Σ F_k, with F_k
    the Fisher of W at the folded weights on k's own data (`continual.merging.merge_lora_deltas`);
    against the version it was trained from, a LoRA version's task vector is its ΔW.
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"merge method {method!r}: expected one of {MERGE_METHODS}")
    if method in TASK_METHODS:
        return _task_merge(states, champion, method, ancestor, density, seed)
    fishers = None
    if method == "fisher":
        # a daily LoRA version's own Fisher covers only what it changed: zero elsewhere
        fishers = zero_filled(
            [s.model.state_dict() for s in states], [_own_fisher(s, memory) for s in states]
        )
    # Versions that widened different features are first re-expressed in one standardisation.
    dicts, aligned, exact = align_for_merge([s.model.state_dict() for s in states], fishers)
    _warn_if_approximate(exact)
    merged = average(dicts) if fishers is None else fisher_merge(dicts, aligned or fishers, eps=eps)
    distances = _distances(states, dicts, merged)
    get_run_logger().info(
        "%s merge of %s; distances %s", method, [s.version for s in states], distances
    )
    return _with_weights(states[0], merged, champion), distances


def _distances(
    states: list[ModelState], dicts: list[dict[str, Tensor]], merged: dict[str, Tensor]
) -> dict[str, float]:
    return {
        f"merge.distance.v{s.version}": parameter_distance(d, merged)
        for s, d in zip(states, dicts, strict=True)
    }


def _task_merge(
    states: list[ModelState],
    champion: ModelState,
    method: str,
    ancestor: ModelState | None,
    density: float | None,
    seed: int,
) -> tuple[ModelState, dict[str, float]]:
    """TIES/DARE on task vectors against the common ancestor, in one standardisation."""
    if ancestor is None:
        raise ValueError(f"a {method} merge needs the versions' common ancestor")
    key = (ancestor.spec.family, ancestor.spec.n_features, ancestor.spec.n_classes)
    if key != (states[0].spec.family, states[0].spec.n_features, states[0].spec.n_classes):
        raise ValueError(
            f"the common ancestor v{ancestor.version} has another architecture than "
            f"{[s.version for s in states]}; their task vectors are not defined"
        )
    chosen = DEFAULT_DENSITY[method] if density is None else density
    # The ancestor is re-expressed with the versions, so θ_k − θ_ancestor is a change of weights,
    # not of standardisation.
    everything = [s.model.state_dict() for s in states] + [ancestor.model.state_dict()]
    dicts, _, exact = align_for_merge(everything)
    _warn_if_approximate(exact)
    task_method = cast(TaskMethod, method)
    merged, kept = task_merge(dicts[:-1], dicts[-1], task_method, density=chosen, seed=seed)
    metrics = _distances(states, dicts[:-1], merged)
    metrics.update(
        {
            f"merge.ancestor.v{ancestor.version}": parameter_distance(dicts[-1], merged),
            "merge.density": chosen,
            "merge.kept_fraction": kept,
        }
    )
    if method.startswith("dare"):
        metrics["merge.seed"] = float(seed)
    get_run_logger().info(
        "%s merge of %s on ancestor v%s (density %s, seed %s): %.1f %% of the merged task "
        "vector non-zero; %s",
        method,
        [s.version for s in states],
        ancestor.version,
        chosen,
        seed,
        100 * kept,
        metrics,
    )
    return _with_weights(states[0], merged, champion), metrics


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
