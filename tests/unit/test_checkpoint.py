"""Checkpoint round trips and failure modes (continual/checkpoint.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from continual.checkpoint import (
    SPEC_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_checkpoint,
    read_spec,
    save_checkpoint,
)
from continual.models import ModelSpec, build_model


def _trained_like(spec: ModelSpec, seed: int = 0) -> torch.nn.Module:
    """A model with non-default weights (so a load that silently re-initialises would differ)."""
    torch.manual_seed(seed)
    model = build_model(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture
def spec() -> ModelSpec:
    return ModelSpec(
        "mlp",
        n_features=6,
        n_classes=3,
        hidden=[8],
        feature_columns=[f"f{i}" for i in range(6)],
        classes=["a", "b", "c"],
        input_mean=[1.0] * 6,
        input_std=[2.0] * 6,
    )


@pytest.mark.parametrize("family", ["mlp", "transformer"])
def test_round_trip_gives_identical_outputs(tmp_path: Path, family: str) -> None:
    spec = ModelSpec(family, n_features=12, n_classes=4, n_tokens=3, d_model=8, n_heads=2)
    model = _trained_like(spec)
    path = save_checkpoint(tmp_path / "ckpt", model, spec)
    assert sorted(p.name for p in path.iterdir()) == [WEIGHTS_FILE, SPEC_FILE]
    loaded, loaded_spec = load_checkpoint(path)
    assert loaded_spec == spec and not loaded.training
    x = torch.randn(9, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_overwrite_keeps_other_files_and_leaves_no_temporaries(tmp_path: Path, spec) -> None:
    directory = tmp_path / "ckpt"
    save_checkpoint(directory, _trained_like(spec, seed=0), spec)
    (directory / "ewc.safetensors").write_bytes(b"owned by EWC")
    (directory / "replay").mkdir()
    newer = _trained_like(spec, seed=1)
    save_checkpoint(directory, newer, spec)
    assert sorted(p.name for p in directory.iterdir()) == [
        "ewc.safetensors",
        WEIGHTS_FILE,
        "replay",
        SPEC_FILE,
    ]
    assert not [p for p in tmp_path.iterdir() if p.name != "ckpt"]  # no staging dirs left
    loaded, _ = load_checkpoint(directory)
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x), newer(x))


def test_shared_tensors_are_saved(tmp_path: Path) -> None:
    spec = ModelSpec("tests.unit.test_checkpoint:tied_factory", n_features=4, n_classes=4)
    model = build_model(spec)
    save_checkpoint(tmp_path / "tied", model, spec)
    loaded, _ = load_checkpoint(tmp_path / "tied")
    assert torch.equal(loaded.a.weight, model.a.weight)


def tied_factory(spec: ModelSpec) -> torch.nn.Module:
    module = torch.nn.Module()
    module.a = torch.nn.Linear(4, 4)
    module.b = torch.nn.Linear(4, 4)
    module.b.weight = module.a.weight  # shared storage: safetensors refuses it unless cloned
    return module


def test_missing_directory_or_files(tmp_path: Path, spec) -> None:
    with pytest.raises(CheckpointError, match=r"spec\.json: missing"):
        load_checkpoint(tmp_path / "nothing-here")
    directory = save_checkpoint(tmp_path / "ckpt", _trained_like(spec), spec)
    (directory / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        load_checkpoint(directory)


def test_invalid_json_and_invalid_spec(tmp_path: Path, spec) -> None:
    directory = save_checkpoint(tmp_path / "ckpt", _trained_like(spec), spec)
    (directory / SPEC_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"spec\.json: not valid JSON"):
        read_spec(directory)
    (directory / SPEC_FILE).write_text(json.dumps({**spec.to_dict(), "colour": "red"}))
    with pytest.raises(CheckpointError, match=r"spec\.json: unknown ModelSpec keys \['colour'\]"):
        load_checkpoint(directory)
    (directory / SPEC_FILE).write_text(json.dumps({**spec.to_dict(), "family": "gone.module:f"}))
    with pytest.raises(
        CheckpointError, match=r"spec\.json: cannot build the model: .*'gone\.module'"
    ):
        load_checkpoint(directory)
    (directory / SPEC_FILE).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        read_spec(directory)


def test_truncated_and_corrupt_weights(tmp_path: Path, spec) -> None:
    directory = save_checkpoint(tmp_path / "ckpt", _trained_like(spec), spec)
    weights = directory / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable or truncated"):
        load_checkpoint(directory)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable or truncated"):
        load_checkpoint(directory)


def test_key_and_shape_mismatches(tmp_path: Path, spec) -> None:
    directory = save_checkpoint(tmp_path / "ckpt", _trained_like(spec), spec)
    weights = directory / WEIGHTS_FILE
    tensors = load_file(str(weights))
    extra = {**tensors, "surprise.weight": torch.zeros(2)}
    del extra["classifier.bias"]
    save_file(extra, str(weights))
    with pytest.raises(CheckpointError, match=r"missing keys \['classifier.bias'\].*surprise"):
        load_checkpoint(directory)
    save_file({**tensors, "classifier.weight": torch.zeros(5, 8)}, str(weights))
    with pytest.raises(CheckpointError, match=r"shape mismatch: classifier.weight: file \(5, 8\)"):
        load_checkpoint(directory)
    # a spec that no longer matches the weights (another architecture) fails the same way
    save_file(tensors, str(weights))
    (directory / SPEC_FILE).write_text(json.dumps({**spec.to_dict(), "hidden": [16]}))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(directory)


def test_peft_model_saves_base_plus_adapter(tmp_path: Path, spec) -> None:
    from continual.lora import LoraSettings, attach_lora
    from continual.training import TrainSettings, train

    torch.manual_seed(0)
    X, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    peft_model = attach_lora(_trained_like(spec), LoraSettings(r=2))
    train(peft_model, X, y, TrainSettings(steps=20, lr=1e-2))
    directory = save_checkpoint(tmp_path / "ckpt", peft_model, spec)
    assert (directory / "adapter" / "adapter_model.safetensors").is_file()
    assert set(load_file(str(directory / WEIGHTS_FILE))) == set(build_model(spec).state_dict())
    expected = peft_model(X)
    merged, _ = load_checkpoint(directory)
    attached, _ = load_checkpoint(directory, adapter="attach")
    base, _ = load_checkpoint(directory, adapter="ignore")
    with torch.no_grad():
        assert type(merged).__name__ == "MLPClassifier"
        assert torch.allclose(merged(X), expected, atol=1e-5)
        assert torch.allclose(attached(X), expected, atol=1e-6)
        assert not torch.allclose(base(X), expected, atol=1e-3)  # the adapter did change outputs
    # saving the merged (plain) model drops the now-stale adapter folder
    save_checkpoint(directory, merged, spec)
    assert not (directory / "adapter").exists()
    (directory / "adapter").mkdir()
    with pytest.raises(CheckpointError, match="adapter: cannot load the adapter"):
        load_checkpoint(directory)
