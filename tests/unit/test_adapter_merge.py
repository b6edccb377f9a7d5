"""Fisher-weighted merging of two LoRA adapters on ΔW = (α/r)·B·A, never on lora_A/lora_B."""

from __future__ import annotations

import copy

import torch
from sklearn.datasets import load_digits

from continual.inference import accuracy
from continual.lora import (
    LoraSettings,
    adapter_snapshot,
    adapter_state_dict,
    attach_lora,
    restore_adapter,
)
from continual.lora_merge import (
    adapter_from_delta,
    delta_fisher,
    lora_delta_weights,
    lora_scaling,
)
from continual.merging import fisher_merge, fold_delta, merge_lora_deltas
from continual.models import ModelSpec, build_model, fit_standardizer
from continual.training import TrainSettings, train


def test_two_adapters_merge_on_delta_w_by_fisher_and_serve() -> None:
    digits = load_digits()
    X = torch.tensor(digits.data[:400], dtype=torch.float32)
    y = torch.tensor(digits.target[:400])
    mean, std = fit_standardizer(digits.data[:400])
    spec = ModelSpec(
        family="transformer",
        n_features=64,
        n_classes=10,
        d_model=16,
        n_heads=2,
        n_layers=1,
        input_mean=mean,
        input_std=std,
    )
    torch.manual_seed(0)
    base = build_model(spec)
    train(base, X[:200], y[:200], TrainSettings(steps=60, lr=5e-3))
    halves = (slice(200, 300), slice(300, 400))
    settings = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    deltas, fishers, factors = [], [], []
    for seed, rows in enumerate(halves):
        adapted = attach_lora(copy.deepcopy(base), settings)
        train(adapted, X[rows], y[rows], TrainSettings(steps=40, lr=5e-3, seed=seed))
        scaling = lora_scaling(adapted.peft_config["default"])
        deltas.append(lora_delta_weights(adapter_state_dict(adapted), scaling=scaling))
        fishers.append(delta_fisher(adapted, X[rows], y[rows]))  # F of W at W0 + ΔW_k, own data
        factors.append(adapter_snapshot(adapted))
    # ΔW and its Fisher are keyed by the plain model's weight names
    targets = {"blocks.0.attn.q_proj.weight", "blocks.0.attn.v_proj.weight"}
    assert set(deltas[0]) == set(fishers[0]) == targets

    merged = merge_lora_deltas(deltas, fishers=fishers)
    for name, value in merged.items():
        floor = 1e-8 * (fishers[0][name].mean() + fishers[1][name].mean()) / 2
        weights = [f[name] + floor for f in fishers]
        expected = sum(w * d[name] for w, d in zip(weights, deltas, strict=True)) / sum(weights)
        torch.testing.assert_close(value, expected)
        assert not torch.allclose(value, deltas[0][name], atol=1e-4)  # both adapters count
        assert not torch.allclose(value, deltas[1][name], atol=1e-4)
    # the trap: merging the raw factors is not merging the products they define
    naive = fisher_merge(factors, [{n: torch.ones_like(t) for n, t in f.items()} for f in factors])
    linear = merge_lora_deltas(deltas)
    naive_delta = lora_delta_weights(naive, scaling=settings.alpha / settings.r)
    for name in targets:
        gap = (naive_delta[name] - linear[name]).norm()
        assert gap > 0.1 * linear[name].norm()

    # fold for serving: a plain model, no peft; both halves above chance (0.1) and the base
    served = build_model(spec)
    served.load_state_dict(fold_delta(base.state_dict(), merged))
    served.eval()
    for rows in halves:
        assert accuracy(served, X[rows], y[rows]) > max(0.3, accuracy(base, X[rows], y[rows]))
    # W0 is shared: merging ΔW equals Fisher-merging the two folded models
    folded = [fold_delta(base.state_dict(), d) for d in deltas]
    for name, value in fisher_merge(folded, fishers).items():
        torch.testing.assert_close(value, served.state_dict()[name])

    # a Fisher-weighted (elementwise) merge is full rank: rank 16 stores it exactly, rank 4 not
    full = LoraSettings(r=16, alpha=16, target_modules=["q_proj", "v_proj"])
    state, errors = adapter_from_delta(merged, full)
    assert max(errors.values()) < 1e-5
    _, truncated = adapter_from_delta(merged, settings)
    assert min(truncated.values()) > 0.05
    target = attach_lora(copy.deepcopy(base), full)
    restore_adapter(target, state)
    with torch.no_grad():
        torch.testing.assert_close(target(X[200:400]), served(X[200:400]), rtol=1e-4, atol=1e-5)
