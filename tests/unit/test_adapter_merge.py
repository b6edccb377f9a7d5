"""Fisher-weighted merging of LoRA adapters (not only of full models)."""

from __future__ import annotations

import copy

import torch
from sklearn.datasets import load_digits

from continual.ewc import diagonal_fisher
from continual.lora import LoraSettings, adapter_snapshot, attach_lora, restore_adapter
from continual.merging import fisher_merge
from continual.models import ModelSpec, build_model, fit_standardizer
from continual.training import TrainSettings, accuracy, train


def test_two_adapters_merge_by_fisher_and_load_back():
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
    adapters, fishers = [], []
    for seed, rows in enumerate(halves):
        adapted = attach_lora(copy.deepcopy(base), LoraSettings(r=4, alpha=8))
        train(adapted, X[rows], y[rows], TrainSettings(steps=40, lr=5e-3, seed=seed))
        adapters.append(adapter_snapshot(adapted))
        fishers.append(diagonal_fisher(adapted, X[rows], y[rows]))
    # the Fisher of a peft model covers exactly its trainable adapter tensors
    assert set(fishers[0]) == set(adapters[0])
    assert all("lora_" in name for name in adapters[0])

    merged = fisher_merge(adapters, fishers)
    for name, value in merged.items():
        weights = [f[name] + 1e-8 for f in fishers]
        expected = sum(w * a[name] for w, a in zip(weights, adapters, strict=True)) / sum(weights)
        torch.testing.assert_close(value, expected)

    target = attach_lora(copy.deepcopy(base), LoraSettings(r=4, alpha=8))
    restore_adapter(target, merged)
    assert all(torch.equal(adapter_snapshot(target)[n], merged[n]) for n in merged)
    chance = 0.1
    for rows in halves:
        assert accuracy(target, X[rows], y[rows]) > 3 * chance
