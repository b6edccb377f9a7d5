"""Online LoRA (via peft) with validation gating: small, reversible daily updates.

LoRA adds W + (α/r)·B·A to chosen Linear layers and trains only A and B, so an update is a few
small tensors that can be snapshotted and restored bit-exactly. `gated_update` keeps an update
only if a judgement of the trained model accepts it (the flows use the promotion gate's own
statistical rule on selection rows), and otherwise restores the snapshot exactly: a bad day's
data never reaches the served weights.

Note: `attach_lora` (like peft's `get_peft_model`) injects the LoRA layers into the model it is
given, and `merge_adapter` folds them back into that same module; deep-copy first if the
original must stay untouched.

Merging adapters happens on ΔW = scaling·B·A, never on A and B (see `continual.merging`):
`lora_delta_weights` turns an adapter state dict into {base weight name: ΔW}, `delta_fisher`
gives the matching Fisher, and `adapter_from_delta` stores a merged ΔW as an adapter again.
`combine_adapters` wraps peft's `add_weighted_adapter` for several adapters on one model, but
only its ΔW-space combinations: in peft 0.21 "linear", "ties", "dare_linear", "dare_ties" and
"magnitude_prune" combine lora_A and lora_B separately (peft itself calls "linear" "a very
rough approximation"), while "cat" is exact and the "*svd" types combine ΔW and truncate it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from continual.fisher import diagonal_fisher
from continual.merging import refactor_delta
from continual.models import default_lora_targets
from continual.training import TrainResult


@dataclass
class LoraSettings:
    """LoRA hyper-parameters.

    Attributes:
        r: rank of the update B·A (8-16 for incremental updates; higher adds capacity and
            forgetting).
        alpha: scaling numerator; the update is scaled by alpha / r.
        dropout: dropout on the LoRA branch input.
        target_modules: Linear layer names (or name suffixes) to adapt; None picks
            `default_lora_targets(model)` (q_proj/v_proj, query/value, else all but classifier).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be > 0, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules is an empty list; use None for the default targets")


def _matches(module_name: str, target: str) -> bool:
    """peft's rule for a string target: the full name or a dotted suffix of it."""
    return module_name == target or module_name.endswith("." + target)


def attach_lora(model: nn.Module, settings: LoraSettings) -> PeftModel:
    """Wrap `model` with fresh LoRA adapters; only the adapter tensors stay trainable.

    Args:
        model: a plain module (modified in place by peft).
        settings: rank, alpha, dropout and target modules.

    Returns:
        The peft model; B is zero-initialised, so it predicts exactly like `model` at first.

    Raises:
        ValueError: a target matches no Linear layer (the message lists the available ones),
            or the model already is a peft model.
    """
    if isinstance(model, PeftModel):
        raise ValueError(
            "the model already carries a LoRA adapter: merge it first (merge_adapter) or keep "
            "training the existing one"
        )
    targets = settings.target_modules or default_lora_targets(model)
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    absent = [t for t in targets if not any(_matches(name, t) for name in linear)]
    if absent:
        raise ValueError(f"LoRA target modules {absent} match no Linear layer; available: {linear}")
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(targets),
        bias="none",
    )
    return get_peft_model(model, config)


def adapter_snapshot(peft_model: nn.Module) -> dict[str, Tensor]:
    """Clones of every trainable (adapter) tensor, keyed by parameter name."""
    return {
        name: p.detach().clone() for name, p in peft_model.named_parameters() if p.requires_grad
    }


@torch.no_grad()
def restore_adapter(peft_model: nn.Module, snapshot: dict[str, Tensor]) -> None:
    """Copy a snapshot back into the adapter tensors, in place and bit-exactly.

    Raises:
        KeyError: the snapshot does not hold exactly the model's trainable tensors.
    """
    params = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    if set(params) != set(snapshot):
        missing = sorted(set(params) - set(snapshot))[:5]
        extra = sorted(set(snapshot) - set(params))[:5]
        raise KeyError(f"snapshot does not fit the model: missing {missing}, extra {extra}")
    for name, p in params.items():
        p.copy_(snapshot[name])


@dataclass
class LoraGateResult:
    """Outcome of one gated update: whether it was kept, and the training run."""

    accepted: bool
    train: TrainResult | None


def gated_update(
    peft_model: nn.Module,
    train_fn: Callable[[nn.Module], TrainResult | None],
    keep_fn: Callable[[nn.Module], bool],
) -> LoraGateResult:
    """Train the adapter; keep the update only if `keep_fn` accepts the trained model.

    `keep_fn` is the judgement, e.g. the promotion gate's non-inferiority rule on selection
    rows against the model before the update (with a zero-initialised adapter that is the
    base model itself). A raw score difference on a short validation set is the trap the
    method guide warns about: its noise discards good updates and keeps bad ones.

    Args:
        peft_model: the model with LoRA attached.
        train_fn: trains the model in place (e.g. `lambda m: train(m, X, y, settings)`).
        keep_fn: called with the trained model; True keeps the update.

    Returns:
        LoraGateResult; when rejected the adapter holds exactly its pre-update values.
    """
    snapshot = adapter_snapshot(peft_model)
    result = train_fn(peft_model)
    peft_model.eval()
    accepted = bool(keep_fn(peft_model))
    if not accepted:
        restore_adapter(peft_model, snapshot)
    return LoraGateResult(accepted, result)


def merge_adapter(peft_model: PeftModel) -> nn.Module:
    """Fold the adapter into the base weights and return the plain module.

    The result has exactly the base model's state-dict keys, so it saves and loads as an
    ordinary checkpoint.
    """
    merged: nn.Module = peft_model.merge_and_unload()
    return merged


def adapter_state_dict(peft_model: PeftModel) -> dict[str, Tensor]:
    """The adapter tensors as peft saves them (`get_peft_model_state_dict`)."""
    state: dict[str, Tensor] = get_peft_model_state_dict(peft_model)
    return state


def save_adapter(peft_model: PeftModel, directory: str | Path) -> None:
    """Save the adapter (adapter_config.json + adapter_model.safetensors) to `directory`.

    The folder is written beside the target and swapped in, so a crash never leaves a
    half-written adapter.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        peft_model.save_pretrained(str(staging), safe_serialization=True)
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, old / directory.name)
            os.replace(staging, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_adapter(model: nn.Module, directory: str | Path, *, trainable: bool = False) -> PeftModel:
    """Attach a saved adapter to `model` (modified in place).

    Args:
        model: a plain module with the same architecture the adapter was trained on.
        directory: folder written by `save_adapter`.
        trainable: keep the adapter trainable (to continue online updates) instead of
            inference-only.

    Raises:
        FileNotFoundError: the folder lacks adapter_config.json or adapter_model.safetensors.
        ValueError: adapter_config.json is not valid JSON.
    """
    directory = Path(directory)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name}: missing; not a saved adapter folder")
    try:
        json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{directory / 'adapter_config.json'}: not valid JSON ({exc})") from exc
    peft_model = PeftModel.from_pretrained(model, str(directory), is_trainable=trainable)
    return peft_model.eval()


# `…q_proj.lora_A.weight` (get_peft_model_state_dict) or `…q_proj.lora_A.default.weight` (snapshot)
_FACTOR_KEY = re.compile(
    r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$"
)
_PEFT_PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel).model (the wrapped module)
_DELTA_SPACE = ("cat", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")


def _base_weight_name(module_name: str) -> str:
    """peft module path → the wrapped model's weight key: `base_model.model.a.b` → `a.b.weight`."""
    return module_name.removeprefix(_PEFT_PREFIX) + ".weight"


def lora_scaling(config: LoraConfig) -> float:
    """The uniform scaling of a LoRA config: α/r (α/√r with use_rslora).

    Raises:
        ValueError: rank_pattern/alpha_pattern (per-module scalings: use `lora_scalings` on the
            loaded model), DoRA, fan_in_fan_out or lora_bias, for which ΔW ≠ scaling·B@A here.
    """
    if config.rank_pattern or config.alpha_pattern:
        raise ValueError(
            f"rank_pattern={config.rank_pattern} / alpha_pattern={config.alpha_pattern}: no single "
            "scaling fits every module; read per-module scalings with lora_scalings(peft_model)"
        )
    if config.use_dora or config.fan_in_fan_out or config.lora_bias:
        raise ValueError("DoRA, fan_in_fan_out and lora_bias adapters are not plain ΔW = s·B@A")
    return config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)


def _lora_layers(peft_model: nn.Module, adapter_name: str) -> dict[str, LoraLayer]:
    layers = {
        name: m
        for name, m in peft_model.named_modules()
        if isinstance(m, LoraLayer) and adapter_name in m.lora_A
    }
    if not layers:
        raise ValueError(f"no LoRA layer of {type(peft_model).__name__} holds {adapter_name!r}")
    for name, m in layers.items():
        plain = isinstance(m.get_base_layer(), nn.Linear) and not m.use_dora.get(adapter_name)
        if not plain or getattr(m, "fan_in_fan_out", False) or m.lora_bias.get(adapter_name):
            raise ValueError(f"{name}: only plain nn.Linear LoRA layers have ΔW = s·B@A here")
    return layers


def lora_scalings(peft_model: nn.Module, adapter_name: str = "default") -> dict[str, float]:
    """{base weight name: scaling} as peft computed it per layer (rank/alpha patterns, rsLoRA).

    Raises:
        ValueError: no layer holds the adapter, or a layer is not a plain Linear LoRA (named).
    """
    layers = _lora_layers(peft_model, adapter_name)
    return {_base_weight_name(n): float(m.scaling[adapter_name]) for n, m in layers.items()}


def _pair_factors(adapter_state: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, tensor in adapter_state.items():
        match = _FACTOR_KEY.match(key)
        if match is None:
            raise ValueError(
                f"{key!r} is not a LoRA factor '<module>.lora_A|lora_B[.<adapter>].weight' "
                "(DoRA magnitudes, LoRA biases, embedding factors, modules_to_save unsupported)"
            )
        pair = pairs.setdefault(_base_weight_name(match["module"]), {})
        if match["factor"] in pair:
            raise ValueError(f"{key!r}: a second lora_{match['factor']} for one module")
        pair[match["factor"]] = tensor
    return pairs


def lora_delta_weights(
    adapter_state: Mapping[str, Tensor], *, scaling: float | Mapping[str, float]
) -> dict[str, Tensor]:
    """ΔW = scaling·B@A per adapted Linear, keyed by the base model's weight name.

    The keys (`blocks.0.attn.q_proj.weight`) are those of the plain model's state_dict, so
    `continual.merging.fold_delta` adds ΔW to it directly. Computed in at least float32, so a
    bf16 product is not rounded before merging.

    Args:
        adapter_state: `adapter_state_dict` / `get_peft_model_state_dict` or `adapter_snapshot`
            output (one adapter).
        scaling: α/r for every module (`lora_scaling(config)`), or {base weight name: scaling}
            (`lora_scalings(model)`) when ranks or alphas differ per module.

    Raises:
        ValueError: no factors, a key that is not a LoRA factor, an unpaired A or B, factor
            shapes that do not multiply, or a module missing from a scaling mapping (named).
    """
    pairs = _pair_factors(adapter_state)
    if not pairs:
        raise ValueError("the adapter state dict holds no lora_A/lora_B tensors")
    deltas: dict[str, Tensor] = {}
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{name!r} has lora_{next(iter(pair))} without its partner")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(
                f"{name!r}: lora_B {tuple(b.shape)} @ lora_A {tuple(a.shape)} is not [out, r] @ [r, in]"
            )
        if isinstance(scaling, Mapping) and name not in scaling:
            raise ValueError(f"no scaling for {name!r}; the mapping has {sorted(scaling)[:5]}")
        s = scaling[name] if isinstance(scaling, Mapping) else scaling
        work = torch.promote_types(a.dtype, torch.float32)
        deltas[name] = float(s) * (b.to(work) @ a.to(work))
    return deltas


def delta_fisher(
    peft_model: nn.Module,
    X: Tensor,
    y: Tensor,
    *,
    adapter_name: str = "default",
    **fisher_options: Any,
) -> dict[str, Tensor]:
    """Diagonal Fisher of each adapted base weight W at the adapted model, keyed like ΔW.

    This is the Fisher `merge_lora_deltas` needs: ∂ℓ/∂W = ∂ℓ/∂ΔW, so F of W at W₀ + ΔW_k on
    adapter k's own data weighs ΔW_k exactly as a Fisher merge of the folded models would. Only
    the base weights are made trainable during the estimate; every requires_grad flag is restored.

    Args:
        peft_model: the adapted model (its own adapter active).
        X, y: adapter k's own data (not a shared set: each model needs its own Fisher).
        adapter_name: the adapter whose layers to cover.
        fisher_options: passed to `continual.fisher.diagonal_fisher` (kind, batch_size, loss_fn…).

    Raises:
        ValueError: no layer holds the adapter, a layer is not a plain Linear LoRA, bad data.
    """
    layers = _lora_layers(peft_model, adapter_name)
    flags = {p: p.requires_grad for p in peft_model.parameters()}
    try:
        for p in flags:
            p.requires_grad_(False)
        for m in layers.values():
            m.get_base_layer().weight.requires_grad_(True)
        fisher = diagonal_fisher(peft_model, X, y, **fisher_options)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {_base_weight_name(n): fisher[f"{n}.base_layer.weight"] for n in layers}


def adapter_from_delta(
    delta: Mapping[str, Tensor], settings: LoraSettings, *, adapter_name: str = "default"
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Store a (merged) ΔW as adapter tensors of rank settings.r, by truncated SVD.

    Returns (adapter tensors keyed like `adapter_snapshot`, for `restore_adapter` on a model
    from `attach_lora(base, settings)`; {base weight name: relative truncation error}). The
    error is ~0 when settings.r ≥ rank(ΔW); a Fisher-weighted merge is usually full rank.

    Raises:
        ValueError: a key that is not a '<module>.weight' name, or a ΔW that is not 2-D.
    """
    odd = [name for name in delta if not name.endswith(".weight")]
    if odd:
        raise ValueError(f"delta keys must be base weight names '<module>.weight', got {odd[:5]}")
    low = refactor_delta(dict(delta), settings.r, scaling=settings.alpha / settings.r)
    state: dict[str, Tensor] = {}
    for name in delta:
        module = _PEFT_PREFIX + name.removesuffix(".weight")
        state[f"{module}.lora_A.{adapter_name}.weight"] = low.lora_A[name]
        state[f"{module}.lora_B.{adapter_name}.weight"] = low.lora_B[name]
    return state, low.relative_error


def combine_adapters(
    peft_model: PeftModel,
    adapters: Sequence[str],
    weights: Sequence[float],
    *,
    name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    density: float | None = None,
) -> None:
    """peft's `add_weighted_adapter`, restricted to combinations made on ΔW; activates `name`.

    Adds adapter `name` = Σ_k w_k ΔW_k (not normalised; "ties_svd"/"dare_*_svd"/"magnitude_
    prune_svd" prune with `density` first) to `peft_model` in place and makes it the active,
    trainable adapter. "cat" is exact (rank = Σ r_k); the "*svd" types truncate to `svd_rank`
    (default: the largest r_k). DARE drops entries at random: seed torch first.

    Raises:
        ValueError: a factor-space combination_type, `name` already taken (peft would silently
            keep the old adapter), or weights that do not match the adapters.
    """
    if combination_type not in _DELTA_SPACE:
        raise ValueError(
            f"combination_type {combination_type!r} combines lora_A and lora_B separately in "
            f"peft, not ΔW = B@A; use one of {_DELTA_SPACE} or continual.merging.merge_lora_deltas"
        )
    if name in peft_model.peft_config:
        raise ValueError(f"adapter {name!r} already exists; pick a new name")
    if len(weights) != len(adapters):
        raise ValueError(f"got {len(adapters)} adapters but {len(weights)} weights")
    peft_model.add_weighted_adapter(
        list(adapters),
        list(weights),
        name,
        combination_type=combination_type,  # type: ignore[arg-type]
        svd_rank=svd_rank,
        density=density,
    )
    peft_model.set_adapter(name)
