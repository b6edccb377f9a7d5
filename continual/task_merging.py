"""TIES and DARE merges on task vectors τ_k = θ_k − θ_ancestor, with peft's own implementations.

Both methods are defined on task vectors, not on weights: they trim, drop or sign-elect the
*changes* versions made to a shared ancestor, and add the combined change back to it. Averaging
weights directly (`continual.merging.average`) is the same as averaging task vectors, but
trimming a weight by magnitude is not: a large weight that did not move is not a large update.

For a LoRA version whose ancestor is the version it was trained from, τ on each adapted Linear is
its ΔW = (α/r)·B·A (a loaded LoRA version is folded, W₀ + ΔW, and W₀ − W₀ is exactly 0 on every
other weight), so the merge combines ΔW products, never lora_A and lora_B separately.

Per tensor, with K task vectors stacked (`peft.utils.merge_utils`, peft ≥ 0.10):

- "ties" (Yadav et al. 2023): keep the top ⌊density·n⌋ entries of each τ_k by magnitude
  (`prune(method="magnitude")`), elect each entry's sign as the sign of Σ_k τ_k over the kept
  values (`calculate_majority_sign_mask(method="total")`), and average only the kept entries that
  agree with it (`disjoint_merge`: sum over agreeing k / their count). Deterministic.
- "dare" (`dare_linear`, Yu et al. 2024): drop each entry of τ_k with probability 1 − density and
  rescale the survivors by 1/density (unbiased: E[τ̃_k] = τ_k), then take the mean over k
  (weights 1/K, the task-vector analogue of the flow's "linear" merge).
- "dare_ties": DARE's drop and rescale, then TIES' sign election and disjoint mean.

DARE's drop is seeded per tensor from (seed, tensor name), on a forked RNG: the same seed gives
the same merge whatever the tensor order or what else used torch's global generator, and the
global generator is left as it was.

Only floating tensors are merged; non-floating buffers come from the first version. peft prunes
per tensor, so a tensor with fewer than 1/density entries keeps none of its change under "ties".
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Literal

import torch
from peft.utils import merge_utils
from torch import Tensor

from continual.merging import StateDict, _check_compatible

TaskMethod = Literal["ties", "dare", "dare_ties"]
TASK_METHODS: tuple[str, ...] = ("ties", "dare", "dare_ties")
DEFAULT_DENSITY: dict[str, float] = {"ties": 0.2, "dare": 0.5, "dare_ties": 0.5}


def task_vectors(states: Sequence[StateDict], ancestor: StateDict) -> list[StateDict]:
    """τ_k = θ_k − θ_ancestor on every floating tensor, in at least float32.

    Raises:
        ValueError: no states, or a state whose keys/shapes differ from the ancestor's (named).
    """
    if not states:
        raise ValueError("task_vectors needs at least one state dict")
    vectors = []
    for k, state in enumerate(states):
        _check_compatible(ancestor, state, f"the ancestor and state {k}")
        vector: StateDict = {}
        for name, base in ancestor.items():
            if base.is_floating_point():
                work = torch.promote_types(base.dtype, torch.float32)
                vector[name] = state[name].to(base.device, work) - base.to(work)
        vectors.append(vector)
    return vectors


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def _combine(method: str, stacked: list[Tensor], density: float) -> Tensor:
    """One tensor's merged τ by peft's function for `method`."""
    count = len(stacked)
    device = stacked[0].device
    if method == "ties":
        ones = torch.ones(count, device=device)
        return merge_utils.ties(stacked, ones, density, majority_sign_method="total")
    if method == "dare":
        equal = torch.full((count,), 1.0 / count, device=device)
        return merge_utils.dare_linear(stacked, equal, density)
    ones = torch.ones(count, device=device)
    return merge_utils.dare_ties(stacked, ones, density, majority_sign_method="total")


def merge_task_vectors(
    vectors: Sequence[StateDict], method: TaskMethod, *, density: float, seed: int = 0
) -> StateDict:
    """Combine K task vectors per tensor by TIES, DARE or DARE-TIES (module docstring).

    Args:
        vectors: K {name: τ_k}, identical keys and shapes.
        method: "ties", "dare" or "dare_ties".
        density: fraction of each τ_k kept, in (0, 1]; 1 keeps everything (TIES is then sign
            election + disjoint mean, DARE the plain mean).
        seed: seeds DARE's random drop (per tensor, see the module docstring); unused by "ties".

    Returns:
        {name: merged τ}, fresh tensors in the first vector's dtypes.

    Raises:
        ValueError: no vectors, unknown method, density outside (0, 1], keys/shapes that differ.
    """
    if not vectors:
        raise ValueError("merge_task_vectors needs at least one task vector")
    if method not in TASK_METHODS:
        raise ValueError(f"task-vector merge method {method!r}: expected one of {TASK_METHODS}")
    if not (math.isfinite(density) and 0.0 < density <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {density}")
    for k, vector in enumerate(vectors[1:], start=1):
        _check_compatible(vectors[0], vector, f"task vector 0 and task vector {k}")
    merged: StateDict = {}
    for name, first in vectors[0].items():
        work = torch.promote_types(first.dtype, torch.float32)
        stacked = [v[name].to(first.device, work) for v in vectors]
        compute = partial(_combine, method, stacked, density)
        merged[name] = _seeded(compute, _tensor_seed(seed, name), first.device).to(first.dtype)
    return merged


def _seeded(compute: Callable[[], Tensor], seed: int, device: torch.device) -> Tensor:
    """Run `compute` with torch's generators seeded, restoring them afterwards; peft's density-1
    "no pruning" warning is silenced (density 1 is a documented choice here, not a mistake)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The density .* no pruning will be performed")
        torch.manual_seed(seed)
        return compute()


def apply_task_vector(ancestor: StateDict, vector: StateDict, like: StateDict) -> StateDict:
    """θ_ancestor + τ on the floating tensors of `vector`, in the ancestor's dtypes; every other
    tensor (non-floating buffers) is copied from `like` (the first version)."""
    merged: StateDict = {}
    for name, base in ancestor.items():
        if name in vector:
            work = torch.promote_types(base.dtype, torch.float32)
            merged[name] = (base.to(work) + vector[name].to(base.device, work)).to(base.dtype)
        else:
            merged[name] = like[name].clone()
    return merged


def task_merge(
    states: Sequence[StateDict],
    ancestor: StateDict,
    method: TaskMethod,
    *,
    density: float,
    seed: int = 0,
) -> tuple[StateDict, float]:
    """θ_ancestor + merge_task_vectors(θ_k − θ_ancestor): the merged state dict, and the fraction
    of the merged task vector's entries that are non-zero (how much of the change survived).

    Raises:
        ValueError: as `task_vectors` and `merge_task_vectors`.
    """
    vectors = task_vectors(states, ancestor)
    merged = merge_task_vectors(vectors, method, density=density, seed=seed)
    total = sum(t.numel() for t in merged.values())
    kept = sum(int(torch.count_nonzero(t)) for t in merged.values())
    return apply_task_vector(ancestor, merged, states[0]), kept / total if total else 0.0
