"""Online LoRA with validation gating (continual/lora.py) on real digits."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
import torch

from continual.lora import (
    LoraSettings,
    adapter_snapshot,
    adapter_state_dict,
    attach_lora,
    gated_update,
    load_adapter,
    merge_adapter,
    restore_adapter,
    save_adapter,
)
from continual.models import ModelSpec, build_model, fit_standardizer
from continual.training import TrainSettings, accuracy, train


@lru_cache(maxsize=1)
def _data() -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32)
    y = torch.tensor(digits.target)
    return {"X": X, "y": y}


@lru_cache(maxsize=1)
def _base_state() -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """A transformer trained briefly on the first 600 digits (the 'champion')."""
    d = _data()
    mean, std = fit_standardizer(d["X"][:600].numpy())
    spec = ModelSpec("transformer", 64, 10, d_model=16, n_heads=2, n_layers=1)
    spec = ModelSpec.from_dict({**spec.to_dict(), "input_mean": mean, "input_std": std})
    torch.manual_seed(0)
    model = build_model(spec)
    train(model, d["X"][:600], d["y"][:600], TrainSettings(steps=120, lr=3e-3))
    return spec, {k: v.clone() for k, v in model.state_dict().items()}


def _champion() -> torch.nn.Module:
    spec, state = _base_state()
    model = build_model(spec)
    model.load_state_dict(state)
    return model.eval()


def _adapter_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="rank r must be > 0"):
        LoraSettings(r=0)
    with pytest.raises(ValueError, match="dropout"):
        LoraSettings(dropout=1.0)
    with pytest.raises(ValueError, match="empty list"):
        LoraSettings(target_modules=[])


def test_attach_trains_only_adapter_and_starts_identical() -> None:
    d = _data()
    champion = _champion()
    with torch.no_grad():
        expected = champion(d["X"][:50])
    peft_model = attach_lora(champion, LoraSettings(r=4))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj.lora_A" in n for n in trainable) and not any(
        "k_proj" in n for n in trainable
    )
    with torch.no_grad():
        assert torch.equal(peft_model(d["X"][:50]), expected)  # B = 0 at start


def test_unknown_target_lists_available_linears() -> None:
    with pytest.raises(ValueError, match=r"\['w_q'\] match no Linear layer; available: .*q_proj"):
        attach_lora(_champion(), LoraSettings(target_modules=["w_q"]))


def test_attaching_twice_is_refused() -> None:
    peft_model = attach_lora(_champion(), LoraSettings(r=2))
    with pytest.raises(ValueError, match="already carries a LoRA adapter"):
        attach_lora(peft_model, LoraSettings(r=2))


def test_gate_restores_bit_exactly_on_regression() -> None:
    d = _data()
    peft_model = attach_lora(_champion(), LoraSettings(r=4))
    X_val, y_val = d["X"][1200:1500], d["y"][1200:1500]
    # give the adapter non-trivial values first, so "restore" is not just "zero B"
    train(peft_model, d["X"][600:900], d["y"][600:900], TrainSettings(steps=30, lr=3e-3))
    before = _adapter_tensors(peft_model)
    shuffled = d["y"][900:1200][torch.randperm(300, generator=torch.Generator().manual_seed(0))]

    def bad_train(model: torch.nn.Module):
        return train(model, d["X"][900:1200], shuffled, TrainSettings(steps=60, lr=2e-2))

    result = gated_update(peft_model, bad_train, lambda m: accuracy(m, X_val, y_val))
    assert not result.accepted
    assert result.score_after < result.score_before
    assert result.train is not None and result.train.steps == 60
    after = _adapter_tensors(peft_model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert accuracy(peft_model, X_val, y_val) == result.score_before


def test_gate_keeps_an_improvement() -> None:
    d = _data()
    peft_model = attach_lora(_champion(), LoraSettings(r=8))
    X_val, y_val = d["X"][1200:1500], d["y"][1200:1500]
    initial = adapter_snapshot(peft_model)

    def good_train(model: torch.nn.Module):
        return train(model, d["X"][600:1200], d["y"][600:1200], TrainSettings(steps=80, lr=5e-3))

    result = gated_update(peft_model, good_train, lambda m: accuracy(m, X_val, y_val))
    assert result.accepted and result.score_after > result.score_before
    assert accuracy(peft_model, X_val, y_val) == result.score_after
    current = adapter_snapshot(peft_model)
    assert any(not torch.equal(current[k], initial[k]) for k in initial)


def test_gate_tolerance() -> None:
    peft_model = attach_lora(_champion(), LoraSettings(r=2))
    scores = iter([0.80, 0.79])
    result = gated_update(peft_model, lambda m: None, lambda m: next(scores), max_regression=0.02)
    assert result.accepted and result.max_regression == 0.02
    with pytest.raises(ValueError, match="max_regression"):
        gated_update(peft_model, lambda m: None, lambda m: 1.0, max_regression=-1)


def test_restore_rejects_foreign_snapshot() -> None:
    peft_model = attach_lora(_champion(), LoraSettings(r=2))
    with pytest.raises(KeyError, match="snapshot does not fit"):
        restore_adapter(peft_model, {"nope": torch.zeros(1)})


def _trained_adapter() -> torch.nn.Module:
    d = _data()
    peft_model = attach_lora(_champion(), LoraSettings(r=4))
    train(peft_model, d["X"][600:1200], d["y"][600:1200], TrainSettings(steps=40, lr=5e-3))
    return peft_model


def test_merge_gives_same_outputs_and_plain_keys() -> None:
    d = _data()
    peft_model = _trained_adapter()
    with torch.no_grad():
        expected = peft_model(d["X"][1200:1400])
    base_keys = set(_champion().state_dict())
    merged = merge_adapter(peft_model)
    assert set(merged.state_dict()) == base_keys
    assert type(merged).__name__ == "TabularTransformer"
    with torch.no_grad():
        assert torch.allclose(merged(d["X"][1200:1400]), expected, atol=1e-5)
        assert not torch.allclose(_champion()(d["X"][1200:1400]), expected, atol=1e-3)


def test_adapter_save_load_round_trip(tmp_path: Path) -> None:
    d = _data()
    peft_model = _trained_adapter()
    state = adapter_state_dict(peft_model)
    assert state and all("lora_" in k for k in state)
    save_adapter(peft_model, tmp_path / "adapter")
    save_adapter(peft_model, tmp_path / "adapter")  # overwriting an existing adapter works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    loaded = load_adapter(_champion(), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(d["X"][1200:1300]), peft_model(d["X"][1200:1300]))
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = load_adapter(_champion(), tmp_path / "adapter", trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_load_adapter_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json: missing"):
        load_adapter(_champion(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{oops")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"adapter_config\.json: not valid JSON"):
        load_adapter(_champion(), tmp_path)
