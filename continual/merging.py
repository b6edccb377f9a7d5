"""Weight-space merging on state dicts: interpolation, EMA over a lineage, plain average,
Fisher-weighted merge.

Everything takes and returns plain `{name: tensor}` state dicts. Inputs are never mutated; every
output tensor is freshly allocated. Merging is lossy: measure `parameter_distance` between
parents and gate the merged model like any other challenger.

LoRA adapters merge on their products ΔW = (α/r)·B·A (`continual.lora_merge.lora_delta_weights`),
never on the raw lora_A/lora_B tensors: the mean of products is not the product of means, and
the factors are only defined up to an invertible r×r matrix (B·A = (B·M)(M⁻¹·A)), so averaging
them averages arbitrary coordinates. `merge_lora_deltas` merges ΔW, `fold_delta` adds it to a
plain state dict for serving, `refactor_delta` turns it back into low-rank factors.

Fisher floor (`eps`, relative): per tensor, ε̄ = eps · mean_k mean(F_k), one floor pooled over
the K models, and each model weighs F_k + ε̄. Relative, so the merge is invariant to rescaling
every Fisher by the same factor (an absolute floor does nothing to a large Fisher and swamps a
tiny one); pooled, so where no model cares (all F_k ≈ 0) the merge is the plain mean instead of
leaning toward the model whose Fisher is larger elsewhere. An all-zero Fisher gives the plain mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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
        raise ValueError("a Fisher merge needs at least one state dict")
    if len(fishers) != len(states):
        raise ValueError(f"got {len(states)} states but {len(fishers)} Fishers")
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


def zero_filled(
    states: Sequence[StateDict], fishers: Sequence[dict[str, Tensor]]
) -> list[dict[str, Tensor]]:
    """The Fishers over the union of their keys, an entry a model's Fisher lacks being zero:
    no importance. What a missing entry means for a version's *own* Fisher: a daily LoRA
    version estimates it only on the parameters it changed (its adapter's target weights and
    its head); elsewhere its weights are its parent's, which its own data did not move, so it
    claims nothing there and the other models decide (all claiming nothing: the plain mean,
    as for an all-zero Fisher).

    Raises:
        ValueError: a Fisher names a parameter the state dicts lack (named).
    """
    names = list(dict.fromkeys(name for fisher in fishers for name in fisher))
    stray = [n for n in names if n not in states[0]]
    if stray:
        raise ValueError(f"Fishers cover {stray[:5]}, which are not in the state dicts")
    return [
        {
            name: fisher[name]
            if name in fisher
            else torch.zeros_like(states[0][name], dtype=_float_type(states[0][name]))
            for name in names
        }
        for fisher in fishers
    ]


def _float_type(tensor: Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def _fisher_weighted(
    thetas: Sequence[Tensor], fishers: Sequence[Tensor], lambdas: Sequence[float], eps: float
) -> Tensor:
    """Σ_k λ_k(F_k+ε̄)θ_k / Σ_k λ_k(F_k+ε̄) with ε̄ = eps·mean_k mean(F_k) (module docstring).

    Where the denominator is zero (every Fisher zero, or a floor that underflowed) the result is
    the λ-weighted plain mean, never 0/0.
    """
    floor = eps * torch.stack([f.mean() for f in fishers]).mean()
    weights = [lam * (f + floor) for lam, f in zip(lambdas, fishers, strict=True)]
    numerator = torch.stack([w * t for w, t in zip(weights, thetas, strict=True)]).sum(0)
    denominator = torch.stack(weights).sum(0)
    plain = torch.stack([lam * t for lam, t in zip(lambdas, thetas, strict=True)]).sum(0)
    plain = plain / sum(lambdas)
    positive = denominator > 0
    return torch.where(positive, numerator / torch.where(positive, denominator, 1.0), plain)


def fisher_merge(
    states: Sequence[StateDict], fishers: Sequence[dict[str, Tensor]], *, eps: float = 1e-8
) -> StateDict:
    """Fisher-weighted average, per parameter: Σ_k (F_k+ε̄)·θ_k / Σ_k (F_k+ε̄).

    ε̄ = eps · mean_k mean(F_k[name]) is relative to each tensor's Fisher scale, pooled over the
    K models (see the module docstring for why). Before this rule ε was absolute (F_k + 1e-8),
    so its effect depended on the Fisher's units; now rescaling every Fisher by c leaves the
    merge unchanged. An all-zero Fisher falls back to the plain mean. Keys without a Fisher
    entry (buffers such as input_mean/std) get the plain mean if floating, the first model's
    value otherwise.

    Args:
        states: K state dicts with identical keys and shapes.
        fishers: K diagonal Fishers (same keys as each other, a subset of the state keys).
        eps: relative weight floor, > 0 (a fraction of the tensor's mean Fisher).

    Returns:
        A new state dict in the first model's dtypes and devices.

    Raises:
        ValueError: mismatched counts, keys or shapes (named), negative or non-finite Fisher.
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    _check_fishers(states, fishers)
    ones = [1.0] * len(states)
    merged: StateDict = {}
    for name, first in states[0].items():
        if not first.is_floating_point():
            merged[name] = first.clone()
            continue
        work = torch.promote_types(first.dtype, torch.float32)
        thetas = [s[name].to(first.device, work) for s in states]
        if name in fishers[0]:
            fs = [f[name].to(first.device, work) for f in fishers]
            value = _fisher_weighted(thetas, fs, ones, eps)
        else:
            value = torch.stack(thetas).mean(0)
        merged[name] = value.to(first.dtype)
    return merged


def average(states: Sequence[StateDict]) -> StateDict:
    """The plain mean of K state dicts: the linear merge, Σ_k θ_k / K on floating tensors.

    The baseline a Fisher-weighted merge should beat (it weighs every parameter of every parent
    equally, whatever data it was fitted on). Non-floating tensors come from the first state.

    Raises:
        ValueError: no states, or keys/shapes that differ (named).
    """
    if not states:
        raise ValueError("average needs at least one state dict")
    for k, state in enumerate(states[1:], start=1):
        _check_compatible(states[0], state, f"state 0 and state {k}")
    merged: StateDict = {}
    for name, first in states[0].items():
        if not first.is_floating_point():
            merged[name] = first.clone()
            continue
        work = torch.promote_types(first.dtype, torch.float32)
        stacked = torch.stack([s[name].to(first.device, work) for s in states])
        merged[name] = stacked.mean(0).to(first.dtype)
    return merged


def _model_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0] * count
    if len(weights) != count:
        raise ValueError(f"got {count} deltas but {len(weights)} weights")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"weights must be finite, >= 0 and not all zero, got {list(weights)}")
    return [float(w) for w in weights]


def merge_lora_deltas(
    deltas: Sequence[StateDict],
    weights: Sequence[float] | None = None,
    *,
    fishers: Sequence[dict[str, Tensor]] | None = None,
    eps: float = 1e-8,
) -> StateDict:
    """Merge LoRA updates on ΔW: weighted mean, or Fisher-weighted when `fishers` is given.

    Linear: Σ_k λ_k ΔW_k / Σ_k λ_k. Fisher: Σ_k λ_k(F_k+ε̄)ΔW_k / Σ_k λ_k(F_k+ε̄), ε̄ as in
    `fisher_merge`. F_k must be the diagonal Fisher of the *base weight W* at adapted model k
    on k's own data (`continual.lora_merge.delta_fisher`): the models being merged are W₀ + ΔW_k, and
    because W₀ is shared, Fisher-merging them equals W₀ + (this merge of ΔW_k). The Fisher of W
    equals that of ΔW (∂ℓ/∂W = ∂ℓ/∂ΔW), costs one pass per adapter and needs no folding. The
    Fishers of lora_A/lora_B have the wrong shape and measure the factors' arbitrary coordinates.

    A Fisher-weighted mean is taken elementwise, so the merged ΔW is generally full rank; fold
    it (`fold_delta`) or re-factor it with a reported truncation error (`refactor_delta`).

    Args:
        deltas: K {base weight name: ΔW}, identical keys and shapes (pad absent modules with 0).
        weights: λ_k ≥ 0, not all zero; None for equal weights. Normalised to sum 1.
        fishers: K Fishers keyed and shaped exactly like the deltas, or None for linear.
        eps: relative Fisher floor, > 0 (ignored without Fishers).

    Returns:
        {base weight name: merged ΔW}, fresh tensors in the first delta's dtypes.

    Raises:
        ValueError: empty input, keys/shapes that differ (named), bad weights, or Fishers that
            do not cover exactly the deltas' keys.
    """
    if not deltas:
        raise ValueError("merge_lora_deltas needs at least one delta")
    lambdas = _model_weights(weights, len(deltas))
    for k, delta in enumerate(deltas[1:], start=1):
        _check_compatible(deltas[0], delta, f"delta 0 and delta {k}")
    if fishers is not None:
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        _check_fishers(deltas, fishers)
        uncovered = sorted(deltas[0].keys() - fishers[0].keys())
        if uncovered:
            raise ValueError(f"the Fishers do not cover the deltas {uncovered[:5]}")
    merged: StateDict = {}
    for name, first in deltas[0].items():
        work = torch.promote_types(first.dtype, torch.float32)
        values = [d[name].to(first.device, work) for d in deltas]
        if fishers is None:
            weighted = [lam * v for lam, v in zip(lambdas, values, strict=True)]
            value = torch.stack(weighted).sum(0) / sum(lambdas)
        else:
            fs = [f[name].to(first.device, work) for f in fishers]
            value = _fisher_weighted(values, fs, lambdas, eps)
        merged[name] = value.to(first.dtype)
    return merged


def fold_delta(base_state: StateDict, delta: StateDict) -> StateDict:
    """W + ΔW for every weight named in `delta`; every other tensor is copied.

    The result has exactly the base state's keys, dtypes and devices, so it loads into the plain
    model and serves without peft.

    Raises:
        ValueError: a delta key is not a floating tensor of the base state (named), or shapes differ.
    """
    for name, d in delta.items():
        if name not in base_state or not base_state[name].is_floating_point():
            raise ValueError(
                f"delta {name!r} is not a floating weight of the base state dict "
                f"(a plain model's state_dict, e.g. 'layer.weight', not peft's 'base_layer.weight')"
            )
        if d.shape != base_state[name].shape:
            raise ValueError(
                f"delta {name!r} has shape {tuple(d.shape)}, "
                f"the base weight has {tuple(base_state[name].shape)}"
            )
    folded: StateDict = {}
    for name, tensor in base_state.items():
        if name in delta:
            work = torch.promote_types(tensor.dtype, torch.float32)
            step = delta[name].to(tensor.device, work)
            folded[name] = (tensor.to(work) + step).to(tensor.dtype)
        else:
            folded[name] = tensor.clone()
    return folded


@dataclass(frozen=True)
class LowRankDelta:
    """Factors with scaling·lora_B[n] @ lora_A[n] ≈ ΔW[n] for every base weight name n.

    Attributes:
        lora_A: {name: A [rank, in]}.
        lora_B: {name: B [out, rank]}.
        relative_error: {name: ||ΔW − scaling·B@A||_F / ||ΔW||_F} (0.0 for ΔW = 0); zero up to
            rounding when rank ≥ rank(ΔW).
        scaling: the adapter scaling the factors were divided by (α/r of the target adapter).
    """

    lora_A: StateDict
    lora_B: StateDict
    relative_error: dict[str, float]
    scaling: float


def refactor_delta(delta: StateDict, rank: int, *, scaling: float = 1.0) -> LowRankDelta:
    """Truncated SVD of each ΔW into LoRA factors, so a merged ΔW can be stored as an adapter.

    ΔW = U·S·Vᵀ; keeping the top `rank` singular values, A = √(S/scaling)·Vᵀ and
    B = U·√(S/scaling) (the balanced split keeps A and B at similar scale for further training).
    By Eckart-Young this is the best rank-`rank` approximation; the error is reported, not
    hidden. A rank above min(out, in) pads the factors with zeros. The SVD runs in float64.

    Args:
        delta: {name: ΔW [out, in]}.
        rank: the target adapter's r, >= 1.
        scaling: the target adapter's α/r, > 0.

    Returns:
        LowRankDelta with factors in each ΔW's dtype (at least float32).

    Raises:
        ValueError: rank < 1, scaling not > 0, or a ΔW that is not a 2-D matrix (named).
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not (math.isfinite(scaling) and scaling > 0):
        raise ValueError(f"scaling must be finite and > 0, got {scaling}")
    factors_a: StateDict = {}
    factors_b: StateDict = {}
    errors: dict[str, float] = {}
    for name, d in delta.items():
        if d.dim() != 2:
            raise ValueError(f"delta {name!r} has shape {tuple(d.shape)}; expected [out, in]")
        u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
        keep = min(rank, s.numel())
        root = (s[:keep] / scaling).sqrt()
        a = torch.zeros(rank, d.shape[1], dtype=torch.float64, device=d.device)
        b = torch.zeros(d.shape[0], rank, dtype=torch.float64, device=d.device)
        a[:keep] = root[:, None] * vh[:keep]
        b[:, :keep] = u[:, :keep] * root
        total = float(s.square().sum())
        errors[name] = math.sqrt(float(s[keep:].square().sum()) / total) if total > 0 else 0.0
        out_dtype = torch.promote_types(d.dtype, torch.float32)
        factors_a[name], factors_b[name] = a.to(out_dtype), b.to(out_dtype)
    return LowRankDelta(factors_a, factors_b, errors, float(scaling))


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
