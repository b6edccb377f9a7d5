"""The training loop (continual/training.py) and the scoring helpers (continual/inference.py) on real digits."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from continual.inference import (
    accuracy,
    correct_mask,
    per_example_loss,
    predict_logits,
    predict_proba,
)
from continual.models import ModelSpec, build_model
from continual.training import TrainResult, TrainSettings, pick_device, train
from tests.digits_tensors import digits_tensors as _digits

CPU = torch.device("cpu")


def _model(seed: int = 0, **overrides) -> torch.nn.Module:
    spec = _digits()[2]
    if overrides:
        spec = ModelSpec.from_dict({**spec.to_dict(), **overrides})
    torch.manual_seed(seed)
    return build_model(spec)


def test_loss_falls_and_model_generalises_on_digits() -> None:
    X, y, _ = _digits()
    model = _model()
    seen: list[tuple[int, float]] = []
    settings = TrainSettings(steps=150, batch_size=32, lr=3e-3)
    result = train(model, X[:1200], y[:1200], settings, on_step=lambda s, v: seen.append((s, v)))
    assert result.steps == 150 and len(result.losses) == 150
    assert result.examples_seen == 150 * 32 and result.device == "cpu"
    assert result.last_loss < 0.25 * result.first_loss
    assert [s for s, _ in seen] == list(range(1, 151)) and seen[-1][1] == result.losses[-1]
    assert not model.training
    assert accuracy(model, X[1200:], y[1200:]) > 0.9


def test_deterministic_on_cpu_for_a_fixed_seed() -> None:
    X, y, _ = _digits()
    settings = TrainSettings(steps=40, batch_size=16, seed=3)
    runs = [train(_model(dropout=0.3), X[:500], y[:500], settings, device=CPU) for _ in range(2)]
    assert runs[0].losses == runs[1].losses
    other = train(
        _model(dropout=0.3), X[:500], y[:500], TrainSettings(steps=40, batch_size=16, seed=4)
    )
    assert other.losses != runs[0].losses


def test_global_rng_is_not_consumed() -> None:
    X, y, _ = _digits()
    model = _model(dropout=0.5)  # seeds the global RNG itself: build first
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(model, X[:100], y[:100], TrainSettings(steps=5), device=CPU)
    assert torch.equal(torch.rand(3), expected)


def test_only_trainable_parameters_move() -> None:
    X, y, _ = _digits()
    model = _model()
    for p in model.layers.parameters():
        p.requires_grad_(False)
    frozen = [p.detach().clone() for p in model.layers.parameters()]
    head = model.classifier.weight.detach().clone()
    train(model, X[:200], y[:200], TrainSettings(steps=10))
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.layers.parameters(), strict=True))
    assert not torch.equal(head, model.classifier.weight)


class _HugeEWC:
    """EWC stand-in that pins every parameter to its anchor with an enormous quadratic pull."""

    mode = "gradient"

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        self.anchor = {n: p.detach().clone() for n, p in model.named_parameters()}

    def add_penalty_grad_(self, model: torch.nn.Module) -> None:
        self.calls += 1
        for n, p in model.named_parameters():
            p.grad.add_(2e6 * (p.detach() - self.anchor[n]))


def _drift(model: torch.nn.Module, anchor: dict[str, torch.Tensor]) -> float:
    return sum(float((p.detach() - anchor[n]).abs().sum()) for n, p in model.named_parameters())


def test_ewc_hook_is_applied_after_backward() -> None:
    X, y, _ = _digits()
    settings = TrainSettings(steps=30, lr=1e-2, max_grad_norm=None)
    free = _model()
    anchor = {n: p.detach().clone() for n, p in free.named_parameters()}
    train(free, X[:300], y[:300], settings)
    pinned = _model()
    ewc = _HugeEWC(pinned)
    train(pinned, X[:300], y[:300], settings, ewc=ewc)
    assert ewc.calls == 30
    assert _drift(pinned, anchor) < 0.2 * _drift(free, anchor)


@pytest.mark.parametrize("mode", ["proximal", "gradient"])
def test_real_ewc_with_huge_lambda_barely_moves(mode: str) -> None:
    ewc_module = pytest.importorskip("continual.ewc")
    X, y, _ = _digits()
    model = _model()
    train(model, X[:300], y[:300], TrainSettings(steps=30, lr=1e-2))
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = _model()
    reference.load_state_dict(model.state_dict())
    # new task: labels shifted by one, which pulls every parameter somewhere else
    shifted = (y[300:600] + 1) % 10
    ewc = ewc_module.EWC.from_model(model, X[:300], y[:300], lam=1e6, mode=mode)
    settings = TrainSettings(steps=30, lr=1e-2, seed=1)
    train(model, X[300:600], shifted, settings, ewc=ewc)
    train(reference, X[300:600], shifted, settings)
    assert _drift(model, anchor) < 0.5 * _drift(reference, anchor)


def _fisher_groups(model: torch.nn.Module) -> tuple[dict, dict]:
    """A hand-made Fisher: each entry is 1, 0.01 or 0 (group 0, 1, 2), at random."""
    gen = torch.Generator().manual_seed(0)
    groups = {n: torch.randint(0, 3, p.shape, generator=gen) for n, p in model.named_parameters()}
    levels = torch.tensor([1.0, 0.01, 0.0])
    return groups, {n: levels[g] for n, g in groups.items()}


def _drift_per_group(
    mode: str | None, *, lam: float = 1e4, max_grad_norm: float | None = None
) -> list[float]:
    """Mean |θ − θ*| per Fisher group after learning shifted labels under EWC in `mode`."""
    ewc_module = pytest.importorskip("continual.ewc")
    X, y, _ = _digits()
    model = _model()
    train(model, X[:300], y[:300], TrainSettings(steps=30, lr=1e-2))
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups, fisher = _fisher_groups(model)
    ewc = None if mode is None else ewc_module.EWC(fisher, anchor, lam=lam, mode=mode)
    settings = TrainSettings(steps=60, lr=1e-2, seed=1, max_grad_norm=max_grad_norm)
    train(model, X[300:600], (y[300:600] + 1) % 10, settings, ewc=ewc)
    moved = {n: (p.detach() - anchor[n]).abs() for n, p in model.named_parameters()}
    return [float(torch.cat([moved[n][groups[n] == k] for n in moved]).mean()) for k in range(3)]


def test_proximal_mode_respects_the_fisher_ratio_gradient_mode_with_adamw_does_not() -> None:
    """Huge λ, Fisher 1 / 0.01 / 0. Proximal: F = 1 pinned, F = 0.01 moves ~100× more, F = 0
    moves freely. Gradient: AdamW divides the penalty gradient by its own running RMS, so every
    penalised parameter jitters around θ* by ~lr whatever its F (measured ratio ≈ 0.9)."""
    free = _drift_per_group(None)[2]
    pinned, weak, zero = _drift_per_group("proximal")
    assert pinned < 1e-4 and weak > 20 * pinned and zero > 0.5 * free
    pinned, weak, _ = _drift_per_group("gradient")
    assert weak < 3 * pinned


def test_ewc_penalty_and_gradient_clipping(monkeypatch) -> None:
    """Proximal: clipping sees the task gradient only. Gradient: the penalty takes over the
    clipping budget and starves every parameter it does not pin (F = 0 moves ~3× less)."""
    ewc_module = pytest.importorskip("continual.ewc")
    training = pytest.importorskip("continual.training")
    X, y, _ = _digits()
    norms: list[float] = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        norm = real_clip(params, max_norm, *args, **kwargs)  # a tensor: the loop keeps it there
        norms.append(float(norm))
        return norm

    monkeypatch.setattr(training.torch.nn.utils, "clip_grad_norm_", spy)
    first_step = {}
    for mode in (None, "proximal", "gradient"):
        model = _model()
        far = {n: p.detach() + 1.0 for n, p in model.named_parameters()}  # anchor away from θ
        fisher = {n: torch.ones_like(p) for n, p in far.items()}
        ewc = None if mode is None else ewc_module.EWC(fisher, far, lam=1e3, mode=mode)
        norms.clear()
        train(model, X[:300], y[:300], TrainSettings(steps=1, max_grad_norm=5.0), ewc=ewc)
        first_step[mode] = norms[0]
    assert first_step["proximal"] == first_step[None]
    assert first_step["gradient"] > 100 * first_step[None]
    monkeypatch.setattr(training.torch.nn.utils, "clip_grad_norm_", real_clip)
    unclipped = _drift_per_group("gradient", max_grad_norm=None)[2]
    assert _drift_per_group("gradient", max_grad_norm=5.0)[2] < 0.5 * unclipped
    assert _drift_per_group("proximal", max_grad_norm=5.0) == _drift_per_group(
        "proximal", max_grad_norm=None
    )


def test_replay_examples_enter_the_batches(monkeypatch) -> None:
    replay_module = pytest.importorskip("continual.replay")
    X, y, _ = _digits()
    calls: list[int] = []
    real_mix = replay_module.mix_batch

    def spy(X_new, y_new, buffer, ratio, generator):
        calls.append(len(y_new))
        return real_mix(X_new, y_new, buffer, ratio, generator)

    monkeypatch.setattr(replay_module, "mix_batch", spy)
    buffer = replay_module.ReservoirBuffer(200, 64, seed=0)
    buffer.add(X[:200], y[:200], "old")
    # the new data holds only classes 0-4; classes 5-9 survive only through the buffer
    new = y[200:1000] < 5
    Xn, yn = X[200:1000][new], y[200:1000][new]
    old = y[1200:] >= 5
    settings = TrainSettings(steps=150)
    old_accuracy = []
    for ratio in (0.0, 0.5):
        model = _model()
        train(model, Xn, yn, settings, replay=buffer, replay_ratio=ratio)
        old_accuracy.append(accuracy(model, X[1200:][old], y[1200:][old]))
    assert calls == [64] * 150  # ratio 0 never mixes; ratio 0.5 mixes every step
    assert old_accuracy[0] < 0.05 and old_accuracy[1] > 0.4


def test_distiller_loss_replaces_task_loss() -> None:
    X, y, _ = _digits()

    class ConstantDistiller:
        def __init__(self) -> None:
            self.inputs = 0

        def loss(self, inputs, student_logits, task_loss):
            self.inputs += len(inputs)
            return task_loss * 0 + 7.0  # no gradient beyond the task path: recorded loss is 7

    distiller = ConstantDistiller()
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    result = train(
        model, X[:100], y[:100], TrainSettings(steps=5, batch_size=10), distiller=distiller
    )
    assert result.losses == [7.0] * 5 and distiller.inputs == 50
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_input_validation() -> None:
    X, y, _ = _digits()
    with pytest.raises(ValueError, match="X is empty"):
        train(_model(), X[:0], y[:0], TrainSettings(steps=1))
    with pytest.raises(ValueError, match="X has 10 rows but y has 9"):
        train(_model(), X[:10], y[:9], TrainSettings(steps=1))
    with pytest.raises(ValueError, match=r"torch\.long"):
        train(_model(), X[:10], y[:10].float(), TrainSettings(steps=1))
    with pytest.raises(ValueError, match="replay_ratio"):
        train(_model(), X[:10], y[:10], TrainSettings(steps=1), replay_ratio=1.0)
    with pytest.raises(ValueError, match="steps and batch_size"):
        TrainSettings(steps=0)


def test_batch_larger_than_data_uses_all_rows() -> None:
    X, y, _ = _digits()
    result = train(_model(), X[:7], y[:7], TrainSettings(steps=3, batch_size=64))
    assert result.examples_seen == 21


def test_result_windows() -> None:
    result = TrainResult(losses=[float(i) for i in range(20)])
    assert result.first_loss == 0.5 and result.last_loss == 18.5
    assert np.isnan(TrainResult().first_loss)


def test_prediction_helpers_agree() -> None:
    X, y, _ = _digits()
    model = _model()
    train(model, X[:600], y[:600], TrainSettings(steps=60))
    logits = predict_logits(model, X[600:700], batch_size=7)
    assert logits.shape == (100, 10) and logits.dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(logits, model(X[600:700]), atol=1e-6)
    proba = predict_proba(model, X[600:700])
    assert torch.allclose(proba.sum(1), torch.ones(100), atol=1e-5)
    mask = correct_mask(model, X[600:700], y[600:700])
    assert mask.dtype == bool and mask.mean() == accuracy(model, X[600:700], y[600:700])
    losses = per_example_loss(model, X[600:700], y[600:700])
    assert losses.shape == (100,) and (losses >= 0).all()
    assert losses[mask].mean() < losses[~mask].mean()
    expected = torch.nn.functional.cross_entropy(logits, y[600:700], reduction="none")
    assert np.allclose(losses, expected.numpy(), atol=1e-6)


def test_pick_device() -> None:
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_nan_loss_aborts_training_with_the_reason() -> None:
    from continual.divergence import TrainingDivergedError

    X, y, _ = _digits()
    X = X[:200].clone()
    X[5, 3] = float("nan")  # one bad value reaches the loss through the batch mean
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(TrainingDivergedError, match="loss is nan"):
        train(model, X, y[:200], TrainSettings(steps=20, batch_size=200))
    for name, param in model.named_parameters():  # the bad step was never applied
        assert torch.isfinite(param).all() and torch.equal(param.detach(), before[name]), name


def test_an_exploding_gradient_aborts_training_instead_of_being_clipped() -> None:
    from continual.divergence import TrainingDivergedError

    X, y, _ = _digits()
    blown_up = X[:200] * 1e9  # finite, but activations and gradients ~1e9: clipping would hide it
    with pytest.raises(TrainingDivergedError, match="gradient norm"):
        train(_model(), blown_up, y[:200], TrainSettings(steps=5))
    healthy = train(_model(), X[:200], y[:200], TrainSettings(steps=5))
    assert healthy.steps == 5 and np.isfinite(healthy.losses).all()


def test_lr_at_warms_up_then_decays_along_a_cosine_to_the_floor():
    from continual.training import lr_at

    constant = TrainSettings(steps=10, lr=1.0)
    assert [lr_at(constant, k) for k in (1, 5, 10)] == [1.0, 1.0, 1.0]  # the default: unchanged
    warm = TrainSettings(steps=10, lr=1.0, warmup_steps=4)
    assert [lr_at(warm, k) for k in (1, 2, 4, 5, 10)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    cosine = TrainSettings(steps=12, lr=2.0, lr_schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    rates = [lr_at(cosine, k) for k in range(1, 13)]
    assert rates[:2] == [1.0, 2.0]
    assert all(a > b for a, b in itertools.pairwise(rates[1:]))  # decays after warm-up
    assert rates[-1] == pytest.approx(0.2)  # the floor at the last step
    assert lr_at(cosine, 7) == pytest.approx(0.2 + 1.8 * 0.5)  # half-way: the mid-point
    for bad in ({"lr_schedule": "linear"}, {"warmup_steps": 10}, {"min_lr_ratio": 1.5}):
        with pytest.raises(ValueError):
            TrainSettings(steps=10, **bad)


def test_train_applies_the_schedule_to_the_optimiser():
    from continual.training import lr_at

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    X, y = torch.randn(32, 3), torch.randint(0, 2, (32,))
    settings = TrainSettings(steps=6, batch_size=8, lr=0.1, lr_schedule="cosine", warmup_steps=2)
    seen: list[float] = []
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    torch.optim.AdamW.step = spy  # type: ignore[method-assign]
    try:
        train(model, X, y, settings, device="cpu")
    finally:
        torch.optim.AdamW.step = original  # type: ignore[method-assign]
    assert seen == pytest.approx([lr_at(settings, k) for k in range(1, 7)])


def test_a_snapshot_is_the_shorter_run_and_loads_back() -> None:
    """Step k's snapshot of a long run holds what a run of k steps ends with (constant lr, same
    seed), so scoring it is early stopping without a second training; `load_trainable_` puts
    it back into the model."""
    from continual.training import load_trainable_, trainable_copy

    X, y, _ = _digits()
    long_model, short_model = _model(), _model()
    long = train(
        long_model,
        X[:400],
        y[:400],
        TrainSettings(steps=30, batch_size=16),
        device=CPU,
        snapshot_at=(10, 20, 99),
    )
    train(short_model, X[:400], y[:400], TrainSettings(steps=20, batch_size=16), device=CPU)
    assert sorted(long.snapshots) == [10, 20]  # a step the run never reaches has none
    short = trainable_copy(short_model)
    assert short.keys() == long.snapshots[20].keys()
    assert all(torch.equal(short[n], long.snapshots[20][n]) for n in short)
    assert not torch.equal(
        trainable_copy(long_model)["classifier.weight"], short["classifier.weight"]
    )
    load_trainable_(long_model, long.snapshots[20])
    assert torch.equal(predict_logits(long_model, X[:50]), predict_logits(short_model, X[:50]))
    with pytest.raises(KeyError, match="lacks"):
        load_trainable_(long_model, {"nope.weight": torch.zeros(1)})
