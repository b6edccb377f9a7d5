"""Weight-space merging on state dicts: interpolation, EMA over a lineage, Fisher-weighted merge.

Everything takes and returns plain `{name: tensor}` state dicts, so the same code merges full
models and LoRA adapters. Inputs are never mutated; every output tensor is freshly allocated.
Merging is lossy: measure `parameter_distance` between parents and gate the merged model like
any other challenger.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

StateDict = dict[str, Tensor]


def _check_compatible(a: StateDict, b: StateDict, what: str = "state dicts") -> None:
    """Same keys and, per key, the same shape; the error names what differs."""
    if a.keys() != b.keys():
        only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        raise ValueError(
            f"{what} have different keys: only in the first {only_a[:5]}, "
            f"only in the second {only_b[:5]}"
        )
    for name, tensor in a.items():
        if tensor.shape != b[name].shape:
            raise ValueError(
                f"{what}: {name!r} has shape {tuple(tensor.shape)} vs {tuple(b[name].shape)}"
            )


def _check_fraction(value: float, name: str) -> None:
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def linear_interpolate(a: StateDict, b: StateDict, alpha: float) -> StateDict:
    """α·a + (1−α)·b on floating tensors; other tensors (integer buffers) are copied from `a`.

    Args:
        a: first state dict (α = 1 returns it exactly).
        b: second state dict, same keys and shapes (α = 0 returns it exactly).
        alpha: weight of `a`, in [0, 1].

    Returns:
        A new state dict in `a`'s dtypes and devices.

    Raises:
        ValueError: alpha out of range, or keys/shapes differ (the key is named).
    """
    _check_fraction(alpha, "alpha")
    _check_compatible(a, b)
    merged: StateDict = {}
    for name, ta in a.items():
        if ta.is_floating_point():
            tb = b[name].to(ta.device, ta.dtype)
            merged[name] = alpha * ta + (1.0 - alpha) * tb
        else:
            merged[name] = ta.clone()
    return merged


def ema_update(ema: StateDict, new: StateDict, decay: float) -> StateDict:
    """decay·ema + (1−decay)·new on floating tensors; integer buffers are taken from `new`.

    Raises:
        ValueError: decay out of [0, 1], or keys/shapes differ.
    """
    _check_fraction(decay, "decay")
    _check_compatible(ema, new, "EMA and new state")
    result: StateDict = {}
    for name, old in ema.items():
        latest = new[name]
        if old.is_floating_point():
            result[name] = decay * old + (1.0 - decay) * latest.to(old.device, old.dtype)
        else:
            result[name] = latest.clone()
    return result


def ema_over_lineage(states: Sequence[StateDict], decay: float) -> StateDict:
    """EMA along a lineage, oldest first: e₁ = s₁, e_k = decay·e_{k−1} + (1−decay)·s_k.

    Raises:
        ValueError: empty lineage, decay out of range, or incompatible states.
    """
    if not states:
        raise ValueError("ema_over_lineage needs at least one state dict")
    _check_fraction(decay, "decay")
    ema = {name: tensor.clone() for name, tensor in states[0].items()}
    for state in states[1:]:
        ema = ema_update(ema, state, decay)
    return ema


def _check_fishers(states: Sequence[StateDict], fishers: Sequence[dict[str, Tensor]]) -> None:
    if not states:
        raise ValueError("fisher_merge needs at least one state dict")
    if len(fishers) != len(states):
        raise ValueError(f"fisher_merge got {len(states)} states but {len(fishers)} Fishers")
    for k, state in enumerate(states[1:], start=1):
        _check_compatible(states[0], state, f"state 0 and state {k}")
    keys = fishers[0].keys()
    for k, fisher in enumerate(fishers):
        if fisher.keys() != keys:
            odd = sorted(fisher.keys() ^ keys)[:5]
            raise ValueError(f"Fisher {k} and Fisher 0 cover different parameters: {odd}")
        for name, f in fisher.items():
            if name not in states[0]:
                raise ValueError(f"Fisher {k} has {name!r}, which is not in the state dicts")
            if f.shape != states[0][name].shape:
                raise ValueError(
                    f"Fisher {k} {name!r} has shape {tuple(f.shape)}, "
                    f"parameter has {tuple(states[0][name].shape)}"
                )
            if bool((f < 0).any()) or not bool(torch.isfinite(f).all()):
                raise ValueError(f"Fisher {k} {name!r} must be finite and non-negative")


def fisher_merge(
    states: Sequence[StateDict], fishers: Sequence[dict[str, Tensor]], *, eps: float = 1e-8
) -> StateDict:
    """Fisher-weighted average, per parameter: Σ_k (F_k+ε)·θ_k / Σ_k (F_k+ε).

    The ε added to every weight keeps the denominator positive and makes an all-zero Fisher
    fall back to the plain mean. Keys without a Fisher entry (buffers such as input_mean/std)
    get the plain mean if floating, the first model's value otherwise.

    Args:
        states: K state dicts with identical keys and shapes.
        fishers: K diagonal Fishers (same keys as each other, a subset of the state keys).
        eps: weight floor, > 0.

    Returns:
        A new state dict in the first model's dtypes and devices.

    Raises:
        ValueError: mismatched counts, keys or shapes (named), negative or non-finite Fisher.
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    _check_fishers(states, fishers)
    merged: StateDict = {}
    for name, first in states[0].items():
        if not first.is_floating_point():
            merged[name] = first.clone()
            continue
        work = torch.promote_types(first.dtype, torch.float32)
        thetas = [s[name].to(first.device, work) for s in states]
        if name in fishers[0]:
            weights = [f[name].to(first.device, work) + eps for f in fishers]
        else:
            weights = [torch.ones_like(t) for t in thetas]
        numerator = torch.stack([w * t for w, t in zip(weights, thetas, strict=True)]).sum(0)
        merged[name] = (numerator / torch.stack(weights).sum(0)).to(first.dtype)
    return merged


def parameter_distance(a: StateDict, b: StateDict) -> float:
    """Relative L2 distance ||a − b|| / ||b|| over the floating keys both share.

    Returns 0.0 for identical states and inf when ||b|| = 0 but a differs.

    Raises:
        ValueError: no shared floating key, or a shared key with different shapes.
    """
    shared = [n for n in a if n in b and a[n].is_floating_point() and b[n].is_floating_point()]
    if not shared:
        raise ValueError("parameter_distance: the state dicts share no floating-point tensor")
    diff_sq, ref_sq = 0.0, 0.0
    for name in shared:
        ta, tb = a[name].double(), b[name].double().to(a[name].device)
        if ta.shape != tb.shape:
            raise ValueError(f"{name!r} has shape {tuple(ta.shape)} vs {tuple(tb.shape)}")
        diff_sq += float((ta - tb).square().sum())
        ref_sq += float(tb.square().sum())
    if ref_sq == 0.0:
        return 0.0 if diff_sq == 0.0 else math.inf
    return math.sqrt(diff_sq / ref_sq)
