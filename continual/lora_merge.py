"""LoRA adapters as weight deltas: merging happens on ΔW = scaling·B·A, never on A and B.

`lora_delta_weights` turns an adapter state dict into {base weight name: ΔW} (the keys of the
plain model's state dict, so `continual.merging` merges and folds them directly), `delta_fisher`
gives the matching Fisher, and `adapter_from_delta` stores a merged ΔW as an adapter again.
`combine_adapters` wraps peft's `add_weighted_adapter` for several adapters on one model, but
only its ΔW-space combinations: in peft 0.21 "linear", "ties", "dare_linear", "dare_ties" and
"magnitude_prune" combine lora_A and lora_B separately (peft itself calls "linear" "a very
rough approximation"), while "cat" is exact and the "*svd" types combine ΔW and truncate it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from continual.fisher import diagonal_fisher
from continual.lora import LoraSettings
from continual.merging import refactor_delta

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
        combination_type=combination_type,
        svd_rank=svd_rank,
        density=density,
    )
    peft_model.set_adapter(name)
