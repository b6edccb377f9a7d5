"""Online LoRA with validation gating (continual/lora.py) on real digits."""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from continual.fisher import diagonal_fisher
from continual.gating import decide
from continual.inference import accuracy, correct_mask
from continual.lora import (
    LoraSettings,
    LoraTargetError,
    adapter_snapshot,
    adapter_state_dict,
    attach_lora,
    gated_update,
    load_adapter,
    merge_adapter,
    restore_adapter,
    save_adapter,
)
from continual.lora_merge import (
    adapter_from_delta,
    combine_adapters,
    delta_fisher,
    lora_delta_weights,
    lora_scaling,
    lora_scalings,
)
from continual.merging import fold_delta, merge_lora_deltas
from continual.models import ModelSpec, build_model, fit_standardizer
from continual.training import TrainSettings, train


@lru_cache(maxsize=1)
def _qv(**settings) -> LoraSettings:
    """LoRA on the attention q/v projections only (a small, known set of adapted weights)."""
    return LoraSettings(target_modules=["q_proj", "v_proj"], **settings)


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
    peft_model = attach_lora(champion, _qv(r=4))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj.lora_A" in n for n in trainable) and not any(
        "k_proj" in n for n in trainable
    )
    with torch.no_grad():
        assert torch.equal(peft_model(d["X"][:50]), expected)  # B = 0 at start


def test_adapter_init_follows_its_seed_not_the_process_history() -> None:
    """A's initial values come from `LoraSettings.seed`, whatever drew from torch's global
    generator before (in one process the demo's earlier flows did, so a daily's adapter used to
    depend on the order of the steps before it), and the global stream is left where it was."""

    def lora_a(seed: int, draws_before: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(123)
        torch.rand(draws_before)
        peft_model = attach_lora(_champion(), _qv(r=4, seed=seed))
        return {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_A" in n}

    first, second = lora_a(0, draws_before=1), lora_a(0, draws_before=1000)
    assert first and all(torch.equal(first[n], second[n]) for n in first)
    other = lora_a(1, draws_before=1)
    assert not all(torch.equal(first[n], other[n]) for n in first)
    champion = _champion()  # building a model draws from the global generator itself
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    attach_lora(champion, _qv(r=4))
    assert torch.equal(torch.rand(3), expected)


def test_unknown_target_lists_available_linears() -> None:
    with pytest.raises(
        LoraTargetError, match=r"\['w_q'\] match no Linear layer; available: .*q_proj"
    ):
        attach_lora(_champion(), LoraSettings(target_modules=["w_q"]))


def test_attaching_twice_is_refused() -> None:
    peft_model = attach_lora(_champion(), _qv(r=2))
    with pytest.raises(ValueError, match="already carries a LoRA adapter"):
        attach_lora(peft_model, _qv(r=2))


def _non_inferior(reference: torch.nn.Module, X_val, y_val):
    """The flows' keep rule: the gate's `decide` on held-out rows against the model before."""
    before = correct_mask(reference, X_val, y_val)
    return lambda m: (
        decide(
            challenger_new_correct=correct_mask(m, X_val, y_val), champion_new_correct=before
        ).promote
    )


def test_gate_restores_bit_exactly_on_regression() -> None:
    d = _data()
    peft_model = attach_lora(_champion(), _qv(r=4))
    X_val, y_val = d["X"][1200:1500], d["y"][1200:1500]
    # give the adapter non-trivial values first, so "restore" is not just "zero B"
    train(peft_model, d["X"][600:900], d["y"][600:900], TrainSettings(steps=30, lr=3e-3))
    before = _adapter_tensors(peft_model)
    score_before = accuracy(peft_model, X_val, y_val)
    keep = _non_inferior(copy.deepcopy(peft_model), X_val, y_val)
    shuffled = d["y"][900:1200][torch.randperm(300, generator=torch.Generator().manual_seed(0))]

    def bad_train(model: torch.nn.Module):
        return train(model, d["X"][900:1200], shuffled, TrainSettings(steps=60, lr=2e-2))

    result = gated_update(peft_model, bad_train, keep)
    assert not result.accepted
    assert result.train is not None and result.train.steps == 60
    after = _adapter_tensors(peft_model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert accuracy(peft_model, X_val, y_val) == score_before


def test_gate_keeps_an_improvement() -> None:
    d = _data()
    peft_model = attach_lora(_champion(), _qv(r=8))
    X_val, y_val = d["X"][1200:1500], d["y"][1200:1500]
    initial = adapter_snapshot(peft_model)
    score_before = accuracy(peft_model, X_val, y_val)
    keep = _non_inferior(copy.deepcopy(peft_model), X_val, y_val)

    def good_train(model: torch.nn.Module):
        return train(model, d["X"][600:1200], d["y"][600:1200], TrainSettings(steps=80, lr=5e-3))

    result = gated_update(peft_model, good_train, keep)
    assert result.accepted
    assert accuracy(peft_model, X_val, y_val) > score_before
    current = adapter_snapshot(peft_model)
    assert any(not torch.equal(current[k], initial[k]) for k in initial)


def test_gate_judges_the_trained_model() -> None:
    peft_model = attach_lora(_champion(), _qv(r=2))
    seen = []

    def judge(model: torch.nn.Module) -> bool:
        seen.append((model is peft_model, model.training))
        return True

    assert gated_update(peft_model, lambda m: None, judge).accepted
    assert seen == [(True, False)]  # called once, on the trained model, in eval mode


def test_restore_rejects_foreign_snapshot() -> None:
    peft_model = attach_lora(_champion(), _qv(r=2))
    with pytest.raises(KeyError, match="snapshot does not fit"):
        restore_adapter(peft_model, {"nope": torch.zeros(1)})


def _trained_adapter() -> torch.nn.Module:
    d = _data()
    peft_model = attach_lora(_champion(), _qv(r=4))
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


_QV = {"blocks.0.attn.q_proj.weight", "blocks.0.attn.v_proj.weight"}


def _folded_model(delta: dict[str, torch.Tensor]) -> torch.nn.Module:
    spec, state = _base_state()
    model = build_model(spec)
    model.load_state_dict(fold_delta(state, delta))
    return model.eval()


def test_folded_delta_matches_peft_merge_and_unload() -> None:
    d = _data()
    peft_model = _trained_adapter()
    scaling = lora_scaling(peft_model.peft_config["default"])
    assert scaling == 16 / 4 and lora_scalings(peft_model) == dict.fromkeys(_QV, scaling)
    delta = lora_delta_weights(adapter_state_dict(peft_model), scaling=scaling)
    from_snapshot = lora_delta_weights(adapter_snapshot(peft_model), scaling=scaling)
    assert set(delta) == _QV and all(torch.equal(delta[k], from_snapshot[k]) for k in _QV)
    folded = _folded_model(delta)
    with torch.no_grad():
        merged = merge_adapter(peft_model)(d["X"][1200:1400])
        assert torch.allclose(folded(d["X"][1200:1400]), merged, atol=1e-5)
        assert not torch.allclose(_champion()(d["X"][1200:1400]), merged, atol=1e-3)


def test_per_module_rank_and_alpha_use_the_scaling_peft_applies() -> None:
    d = _data()
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 32},
    )
    peft_model = get_peft_model(_champion(), config)
    train(peft_model, d["X"][600:900], d["y"][600:900], TrainSettings(steps=20, lr=5e-3))
    with pytest.raises(ValueError, match="no single scaling fits every module"):
        lora_scaling(peft_model.peft_config["default"])
    scalings = lora_scalings(peft_model)
    assert scalings == {"blocks.0.attn.q_proj.weight": 8 / 2, "blocks.0.attn.v_proj.weight": 32 / 4}
    state = adapter_state_dict(peft_model)
    with torch.no_grad():
        expected = merge_adapter(peft_model)(d["X"][1200:1300])
        right = _folded_model(lora_delta_weights(state, scaling=scalings))(d["X"][1200:1300])
        wrong = _folded_model(lora_delta_weights(state, scaling=8 / 4))(d["X"][1200:1300])
    assert torch.allclose(right, expected, atol=1e-5)
    assert not torch.allclose(wrong, expected, atol=1e-3)


def test_lora_delta_weights_errors_name_the_key() -> None:
    a, b = torch.ones(2, 3), torch.ones(4, 2)
    with pytest.raises(ValueError, match=r"'m\.lora_magnitude_vector' is not a LoRA factor"):
        lora_delta_weights({"m.lora_magnitude_vector": a}, scaling=1.0)
    with pytest.raises(ValueError, match=r"'m\.weight' has lora_A without its partner"):
        lora_delta_weights({"m.lora_A.weight": a}, scaling=1.0)
    with pytest.raises(ValueError, match=r"lora_B \(4, 3\) @ lora_A \(2, 3\)"):
        lora_delta_weights({"m.lora_A.weight": a, "m.lora_B.weight": torch.ones(4, 3)}, scaling=1)
    with pytest.raises(ValueError, match=r"no scaling for 'm\.weight'"):
        lora_delta_weights({"m.lora_A.weight": a, "m.lora_B.weight": b}, scaling={"n.weight": 1})
    with pytest.raises(ValueError, match="no lora_A/lora_B"):
        lora_delta_weights({}, scaling=1.0)


def test_delta_fisher_is_the_fisher_of_the_base_weight_at_the_adapted_model() -> None:
    d = _data()
    peft_model = _trained_adapter()
    flags = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    X, y = d["X"][600:800], d["y"][600:800]
    fisher = delta_fisher(peft_model, X, y)
    assert {n: p.requires_grad for n, p in peft_model.named_parameters()} == flags
    scaling = lora_scaling(peft_model.peft_config["default"])
    folded = _folded_model(lora_delta_weights(adapter_state_dict(peft_model), scaling=scaling))
    for name, p in folded.named_parameters():
        p.requires_grad_(name in _QV)
    reference = diagonal_fisher(folded, X, y)  # same function, plain model, ∂ℓ/∂W
    assert set(fisher) == _QV
    for name in _QV:
        assert fisher[name].shape == (16, 16) and fisher[name].sum() > 0
        torch.testing.assert_close(fisher[name], reference[name], rtol=1e-4, atol=1e-8)


def test_merged_delta_stored_as_an_adapter_again() -> None:
    d = _data()
    delta = lora_delta_weights(adapter_state_dict(_trained_adapter()), scaling=16 / 4)
    gen = torch.Generator().manual_seed(0)
    other = {
        k: torch.randn(16, 4, generator=gen) @ torch.randn(4, 16, generator=gen) for k in delta
    }
    other = {k: v * delta[k].std() / v.std() for k, v in other.items()}  # rank 4, same scale
    merged = merge_lora_deltas([delta, other], [0.7, 0.3])  # rank ≤ 8 (two rank-4 products)
    settings = _qv(r=8, alpha=4)
    state, errors = adapter_from_delta(merged, settings)
    assert max(errors.values()) < 1e-5
    target = attach_lora(_champion(), settings)
    restore_adapter(target, state)
    with torch.no_grad():
        stored = target(d["X"][1200:1300])
        assert torch.allclose(stored, _folded_model(merged)(d["X"][1200:1300]), atol=1e-5)
    _, truncated = adapter_from_delta(merged, _qv(r=2))
    assert min(truncated.values()) > 1e-2


def test_combine_adapters_uses_peft_only_on_delta_w() -> None:
    peft_model = _trained_adapter()
    first = lora_delta_weights(adapter_snapshot(peft_model), scaling=4.0)
    peft_model.add_adapter("second", peft_model.peft_config["default"])
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".second." in name:
                p.normal_(std=0.1)
    snapshot = {n: p.detach().clone() for n, p in peft_model.named_parameters() if ".second." in n}
    second = lora_delta_weights(snapshot, scaling=4.0)
    for kind in ("linear", "ties", "dare_linear"):
        with pytest.raises(ValueError, match="combines lora_A and lora_B separately"):
            combine_adapters(
                peft_model, ["default", "second"], [0.5, 0.5], name=kind, combination_type=kind
            )
    mean = merge_lora_deltas([first, second])
    for kind in ("cat", "svd"):
        combine_adapters(
            peft_model,
            ["default", "second"],
            [0.5, 0.5],
            name=kind,
            combination_type=kind,
            svd_rank=8,
        )
        assert peft_model.active_adapter == kind
        combined = lora_delta_weights(
            adapter_snapshot(peft_model), scaling=lora_scalings(peft_model, kind)
        )
        for key in _QV:
            torch.testing.assert_close(combined[key], mean[key], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="'cat' already exists"):
        combine_adapters(
            peft_model, ["default", "second"], [1.0, 1.0], name="cat", combination_type="cat"
        )
