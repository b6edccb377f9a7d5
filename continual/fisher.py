"""Per-example diagonal Fisher: the importance weights behind EWC and Fisher-weighted merges.

Kept apart from `continual.ewc` because estimating the Fisher is the costly, intricate part and
the penalty only consumes its output. The Fisher is the mean of **per-example** squared
gradients: squaring the gradient of a mini-batch mean instead gives roughly F/|B|, which makes λ
silently depend on the batch size.

Three kinds (`kind=`), all from per-example gradients g_c = ∂ℓ(x, c)/∂θ:
- "empirical": g² at the true label y. Grows with (p − y)² where the model fits badly, so after a
  drift it can grow by orders of magnitude and stiffen the model, which then fits worse.
- "true": the expected Fisher Σ_c p_c(x)·g_c² under the model's own predictive distribution p
  (softmax of the logits), computed exactly. It does not depend on the labels, so it cannot feed
  back on a bad fit. Costs C − 1 backward passes per example (C with a custom loss_fn).
- "sampled": g² at labels ŷ ~ p drawn with a seeded generator (`n_samples` per example): an
  unbiased estimate of the true Fisher at the cost of one empirical pass.
- "auto" (the default, also EWC's): "true" up to `TRUE_FISHER_MAX_CLASSES` = 16 classes, else
  "sampled". Exact, label-free and noise-free while C stays small; the Fisher is computed once
  per model version, never per step, so its cost is paid once. Measured with 10 classes, N=2048,
  one CPU thread (benchmarks/bench_fisher.py), against the cheap biased estimate most libraries
  ship (squared mini-batch gradients, |B| = 64 / 256): "empirical" and "sampled" 0.9-1.4× /
  1.4-2.0×; "true" 3.2× / 4.7× on an all-Linear MLP, 9× / 13× on a transformer. With hundreds
  of classes, or a large model on the vmap path, pass kind="sampled" (same quality on the
  permuted-digits forgetting test: 0.199 with either).

How: every kind is a set of K backward vectors v at the logits per example
(`continual.fisher_kinds`), and F = (1/N) Σ_n Σ_k (J_nᵀ v_nk)² with J = ∂z/∂θ. Per-example
gradients are cheap for `nn.Linear` (per-example grad = g aᵀ, so Σ_n grad_n² = (g∘g)ᵀ(a∘a): one
matmul per layer, taken from forward hooks and verified per layer against autograd on a few
examples; `continual.fisher_linear`); every other trainable parameter gets per-sample gradients
from `torch.func.vmap` over `vjp(functional_call)` (here), in chunks so memory stays bounded.
Squares are taken and summed in float32 (or the promoted type), also for bf16/fp16 models.

A causal LM (`continual.causal_lm`, logits [N, L, V]) gets the empirical Fisher of each
sequence's summed next-token NLL with padding masked (`causal_lm_targets`): the same per-example
machinery, one example = one sequence, the ids as targets.
`continual.fisher_reference.brute_force_fisher` is the slow autograd loop the tests check against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from continual.causal_lm import is_causal_lm, sequence_nll, unmasked_right_padding
from continual.fisher_kinds import (
    FisherKind,
    LossFn,
    accumulator_dtype,
    backward_vectors,
    check_args,
    cross_entropy,
    eval_mode,
    label_draws,
    resolve_kind,
    square,
    trainable_parameters,
)
from continual.fisher_linear import (
    LinearSite,
    linear_sites,
    linear_squared_sums,
    run_captured,
    site_tensors,
    verified_sites,
    worth_a_hook_pass,
)
from continual.models import as_logits

_CHUNK_VALUES = 2**24  # default bound on per-sample gradient values held at once
_PROBE_EXAMPLES = 3  # odd, so a [T, B, D] layout is unlikely to pass the per-example check


def _vmap_squared_sums(
    model: nn.Module, names: list[str], loss_fn: LossFn, kind: str, one_at_a_time: bool
) -> Callable[[Tensor, Tensor, Tensor], dict[str, Tensor]]:
    """Return f(x, y, u) -> {name: Σ_n Σ_k grad_nk²} for `names`, per-sample grads from vmap."""
    params = dict(model.named_parameters())
    fixed = {n: p.detach() for n, p in params.items() if n not in names}
    fixed.update(dict(model.named_buffers()))
    diff = {n: params[n].detach() for n in names}

    def example_squares(
        weights: dict[str, Tensor], xi: Tensor, yi: Tensor, ui: Tensor
    ) -> dict[str, Tensor]:
        def logits(w: dict[str, Tensor]) -> Tensor:
            return as_logits(functional_call(model, {**fixed, **w}, (xi.unsqueeze(0),)))

        pair = vjp(logits, weights)  # torch types it as (out, pullback) or, with aux, a triple
        z, pullback = pair[0], pair[1]
        vectors = backward_vectors(kind, loss_fn, z, yi.unsqueeze(0), ui.unsqueeze(0)).to(z.dtype)
        if vectors.shape[0] == 1:  # a sum over a size-1 dim would cost another copy
            return {n: square(g) for n, g in pullback(vectors[0])[0].items()}
        if not one_at_a_time:
            return {n: square(g).sum(0) for n, g in vmap(pullback)(vectors)[0].items()}
        sums = {n: square(g) for n, g in pullback(vectors[0])[0].items()}
        for vector in vectors[1:]:
            for n, g in pullback(vector)[0].items():
                sums[n] = sums[n] + square(g)
        return sums

    per_example = vmap(example_squares, in_dims=(None, 0, 0, 0))

    def squared_sums(x: Tensor, y: Tensor, u: Tensor) -> dict[str, Tensor]:
        # Fused SDPA kernels have no vmap batching rule (slow fallback); the math kernel has.
        with sdpa_kernel(SDPBackend.MATH):
            squares = per_example(diff, x, y, u)
        return {n: squares[n].sum(0) for n in names}

    return squared_sums


def _plan(
    model: nn.Module,
    trainable: dict[str, nn.Parameter],
    X: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    linear_fast_path: bool,
) -> tuple[dict[str, LinearSite], list[str]]:
    """Split trainable parameters into verified closed-form Linear sites and the vmap rest."""
    sites = linear_sites(model, trainable) if linear_fast_path else {}
    if sites:
        device = next(iter(trainable.values())).device
        x, t = X[:_PROBE_EXAMPLES].to(device), y[:_PROBE_EXAMPLES].to(device)
        sites = verified_sites(model, sites, x, t, loss_fn)
    covered = {p for site in sites.values() for p in site.params.values()}
    if sites and len(covered) < len(trainable):
        sites = worth_a_hook_pass(sites)
        covered = {p for site in sites.values() for p in site.params.values()}
    return sites, [n for n in trainable if n not in covered]


def fisher_paths(
    model: nn.Module, X: Tensor, y: Tensor, *, loss_fn: LossFn | None = None
) -> dict[str, str]:
    """Which path `diagonal_fisher` takes per trainable parameter: "linear" or "vmap".

    For diagnostics and benchmarks; only the first few examples of X/y are used.
    """
    check_args(X, y, "auto", 1)
    trainable = trainable_parameters(model)
    padding: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if is_causal_lm(model) and loss_fn is None:
        y, _, loss_fn = causal_lm_targets(model, X, "auto")
        padding = unmasked_right_padding(model, X)
    with eval_mode(model), padding:
        _, rest = _plan(model, trainable, X, y, loss_fn or cross_entropy, True)
    return {n: "vmap" if n in rest else "linear" for n in trainable}


def _add_batch(
    total: dict[str, Tensor],
    model: nn.Module,
    sites: dict[str, LinearSite],
    vmap_sums: Callable[[Tensor, Tensor, Tensor], dict[str, Tensor]] | None,
    batch: tuple[Tensor, Tensor, Tensor],
    kind: str,
    loss_fn: LossFn,
    chunk_size: int,
) -> None:
    """Add one batch's Σ_n Σ_k grad_nk² to `total`: hook path for `sites`, vmap for the rest."""
    x, y, u = batch
    if sites:
        z = run_captured(model, sites, x)
        vectors = backward_vectors(kind, loss_fn, z, y, u).to(z.dtype)
        for name, (a, g) in site_tensors(sites, z, vectors, x.shape[0]).items():
            for attr, value in linear_squared_sums(a, g, chunk_size).items():
                if attr in sites[name].params:
                    total[sites[name].params[attr]] += value
    if vmap_sums is not None:
        for c in range(0, x.shape[0], chunk_size):
            part = vmap_sums(x[c : c + chunk_size], y[c : c + chunk_size], u[c : c + chunk_size])
            for name, value in part.items():
                total[name] += value


def diagonal_fisher(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    *,
    kind: FisherKind = "auto",
    n_samples: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    loss_fn: LossFn | None = None,
    chunk_size: int | None = None,
    linear_fast_path: bool = True,
) -> dict[str, Tensor]:
    """Diagonal Fisher F_i = (1/N) Σ_n E[(∂ℓ(x_n, ·)/∂θ_i)²] from per-example gradients.

    Args:
        model: any module; estimated in eval mode, previous modes restored. `.grad` is untouched.
        X: inputs, float [N, F] / [N, T, D] or token ids long [N, L]; moved batch-wise to the model.
        y: targets [N] (class ids for the default cross-entropy); only "empirical" uses them.
        kind: "empirical", "true", "sampled" or "auto" (see the module docstring).
        n_samples: labels drawn per example for "sampled".
        seed: seeds the label draws of "sampled"; the result does not depend on batching.
        batch_size: examples per forward pass; the result does not depend on it.
        loss_fn: `(logits, target) -> per-example losses [B]`; default cross-entropy. For "true"
            and "sampled" the predictive distribution is softmax(logits), logits [B, C].
        chunk_size: examples per vmap call; bounds the memory of per-sample gradients (about
            chunk_size × K × parameters, K = 1, n_samples or the number of classes). None: as
            many as keep that under 2**24 values (64 MB in float32), at most batch_size.
        linear_fast_path: use the closed form for plain `nn.Linear` layers (False: vmap only).

    Returns:
        {parameter name: Fisher tensor} for every parameter with requires_grad, in
        `named_parameters()` order; float32 (float64 for a float64 model), also for bf16 models.

    Raises:
        ValueError: empty or mismatched data, unknown kind, no trainable parameters, or a
            loss_fn that does not return one loss per example.
    """
    sums = squared_gradient_sums(
        model,
        X,
        y,
        kind=kind,
        n_samples=n_samples,
        seed=seed,
        batch_size=batch_size,
        loss_fn=loss_fn,
        chunk_size=chunk_size,
        linear_fast_path=linear_fast_path,
    )
    return {n: value / X.shape[0] for n, value in sums.items()}


def causal_lm_targets(
    model: nn.Module, X: Tensor, kind: FisherKind
) -> tuple[Tensor, FisherKind, LossFn]:
    """What the Fisher of a causal LM is taken of: the empirical Fisher of each sequence's
    summed next-token NLL (`continual.causal_lm.sequence_nll`, padding masked), the targets
    being the token ids themselves (a flow's labels for this family are placeholders).

    Per-sequence gradients, not per-token: a sequence is the sample. The logits are [N, L, V],
    so "true"/"sampled" (an expectation or a draw over V classes, per position) are not
    implemented; "auto" means "empirical".

    Raises:
        ValueError: kind "true" or "sampled".
    """
    if kind not in ("auto", "empirical"):
        raise ValueError(
            f"Fisher kind {kind!r} is not implemented for a causal LM ([N, L, V] logits); "
            "use 'empirical' (or 'auto')"
        )
    pad = int(getattr(model, "pad_token_id"))  # noqa: B009  # an HFCausalLM, maybe under peft
    return X, "empirical", sequence_nll(pad)


def squared_gradient_sums(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    *,
    kind: FisherKind = "auto",
    n_samples: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    loss_fn: LossFn | None = None,
    chunk_size: int | None = None,
    linear_fast_path: bool = True,
    draws: Tensor | None = None,
) -> dict[str, Tensor]:
    """Σ_n Σ_k grad_nk² per trainable parameter: `diagonal_fisher` before its one division by N.

    Sums add across shards, so a distributed Fisher all-reduces these and divides once by the
    global N (`continual.distributed.distributed_fisher`). Arguments as `diagonal_fisher`;
    `draws` ([N, n_samples] uniforms for kind "sampled") replaces the ones drawn from `seed`, so
    a shard can use its rows' slice of the global draws and match the single-process result.
    """
    check_args(X, y, kind, n_samples)
    if batch_size < 1 or (chunk_size is not None and chunk_size < 1):
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size}, {chunk_size}")
    padding: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    if is_causal_lm(model) and loss_fn is None:
        y, kind, loss_fn = causal_lm_targets(model, X, kind)
        padding = unmasked_right_padding(model, X)
    with padding:
        return _squared_sums(
            model,
            X,
            y,
            kind,
            n_samples,
            seed,
            batch_size,
            loss_fn or cross_entropy,
            chunk_size,
            linear_fast_path,
            draws,
        )


def _squared_sums(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    kind: FisherKind,
    n_samples: int,
    seed: int,
    batch_size: int,
    loss_fn: LossFn,
    chunk_size: int | None,
    linear_fast_path: bool,
    draws: Tensor | None,
) -> dict[str, Tensor]:
    trainable = trainable_parameters(model)
    device = next(iter(trainable.values())).device
    total = {n: torch.zeros_like(p, dtype=accumulator_dtype(p.dtype)) for n, p in trainable.items()}
    with eval_mode(model):
        kind, vectors = resolve_kind(kind, model, X[:1].to(device), n_samples, loss_fn)
        per_example = vectors * sum(p.numel() for p in trainable.values())
        chunk = chunk_size or max(1, min(batch_size, _CHUNK_VALUES // per_example))
        if draws is None or kind != "sampled":
            draws = label_draws(X.shape[0], kind, n_samples, seed)
        elif draws.shape[0] != X.shape[0]:
            raise ValueError(f"draws has {draws.shape[0]} rows but X has {X.shape[0]}")
        sites, rest = _plan(model, trainable, X, y, loss_fn, linear_fast_path)
        # K per-example gradients of one example above the budget: take them one at a time
        one_at_a_time = per_example > _CHUNK_VALUES
        vmap_sums = _vmap_squared_sums(model, rest, loss_fn, kind, one_at_a_time) if rest else None
        for start in range(0, X.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            batch = (X[rows].to(device), y[rows].to(device), draws[rows].to(device))
            _add_batch(total, model, sites, vmap_sums, batch, kind, loss_fn, chunk)
    return total
