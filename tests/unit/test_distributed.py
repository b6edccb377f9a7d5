"""Distributed training under torchrun with 2 gloo processes on CPU (real torch.distributed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from continual.distributed import DistributedJob, rank_seed, rank_settings, shard_rows
from continual.ewc import EWC
from continual.fisher import diagonal_fisher
from continual.inference import accuracy
from continual.models import ModelSpec, build_model
from continual.training import TrainSettings
from tasks.distributed import DistributedTrainingError, run_distributed


def _data(n: int = 301, features: int = 12, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, features, generator=g)
    w = torch.randn(features, classes, generator=g)
    return X, (X @ w).argmax(dim=1)


def _mlp(features: int = 12, classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    spec = ModelSpec(family="mlp", n_features=features, n_classes=classes, hidden=[32, 16])
    return build_model(spec)


def test_shards_cover_every_row_once_and_seeds_differ():
    rows = torch.cat([shard_rows(301, r, 3) for r in range(3)])
    assert sorted(rows.tolist()) == list(range(301))
    assert rank_seed(7, 0) == 7 and len({rank_seed(7, r) for r in range(4)}) == 4
    settings = rank_settings(TrainSettings(batch_size=64, seed=7), 1, 2)
    assert settings.batch_size == 32 and settings.seed == rank_seed(7, 1)
    with pytest.raises(ValueError, match=r"lower train\.processes"):
        shard_rows(1, 0, 2)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["true", "sampled"])
def test_fisher_from_two_ranks_equals_single_process(kind):
    X, y = _data()
    model = _mlp()
    expected = diagonal_fisher(model, X, y, kind=kind)
    job = DistributedJob(model=model, X=X, y=y, settings=None, fisher_kind=kind)
    lines: list[str] = []
    outcome = run_distributed(job, 2, lines.append)
    assert outcome.world_size == 2 and outcome.fisher is not None
    assert any("[rank 1]" in line for line in lines)  # both ranks' logs reach the caller
    for name, value in expected.items():
        got = outcome.fisher[name]
        scale = value.abs().max()
        assert float((got - value).abs().max() / scale) < 1e-6, name


@pytest.mark.slow
def test_two_rank_ewc_replay_training_learns_and_returns_weights():
    from continual.replay import ReservoirBuffer

    X, y = _data(n=400)
    model = _mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ewc = EWC.from_model(model, X[:100], y[:100], lam=10.0)
    buffer = ReservoirBuffer(capacity=100, n_features=12, seed=0)
    buffer.add(X[:100], y[:100], batch_id="old")
    settings = TrainSettings(steps=120, batch_size=64, lr=1e-2)
    job = DistributedJob(
        model, X, y, settings, ewc=ewc, replay=buffer, replay_ratio=0.3, fisher_kind="true"
    )
    outcome = run_distributed(job, 2, lambda _line: None)
    assert outcome.result is not None and outcome.result.steps == 120
    assert outcome.result.last_loss < outcome.result.first_loss
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert accuracy(model, X, y) > 0.7
    expected = diagonal_fisher(model, X, y, kind="true")  # Fisher of the returned weights
    assert torch.allclose(outcome.fisher["layers.0.weight"], expected["layers.0.weight"], rtol=1e-4)


@pytest.mark.slow
def test_a_failing_rank_fails_the_job_with_its_rank_and_keeps_the_model():
    X, y = _data()
    model = build_model(ModelSpec("tests.distributed_models:fails_on_rank_one", 12, 4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    job = DistributedJob(model, X, y, TrainSettings(steps=5, batch_size=16))
    with pytest.raises(DistributedTrainingError, match="rank 1 of 2 failed: RuntimeError"):
        run_distributed(job, 2, lambda _line: None)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.slow
def test_two_rank_lora_training_updates_only_the_adapter():
    from continual.lora import LoraSettings, attach_lora

    X, y = _data()
    model = attach_lora(_mlp(), LoraSettings(r=4, alpha=8))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = accuracy(model, X, y)
    job = DistributedJob(model, X, y, TrainSettings(steps=80, batch_size=32, lr=1e-2))
    run_distributed(job, 2, lambda _line: None)
    params = dict(model.named_parameters())
    assert all(torch.equal(value, params[n]) for n, value in frozen.items())
    assert accuracy(model, X, y) > before + 0.1
