"""The torchrun job and result as safetensors + JSON: round trips, and no pickle on the way."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from continual.distributed import DistributedJob, DistributedResult
from continual.distributed_files import (
    DATA_FILE,
    JOB_FILE,
    MODEL_DIR,
    RESULT_FILE,
    RESULT_TENSORS,
    WEIGHTS_FILE,
    JobFileError,
    read_job,
    read_result,
    write_job,
    write_result,
)
from continual.ewc import EWC
from continual.lora import LoraSettings, attach_lora
from continual.models import ModelSpec, build_model, spec_of
from continual.replay import ReservoirBuffer
from continual.training import TrainResult, TrainSettings
from tasks.state import make_trainable

SPEC = ModelSpec(family="mlp", n_features=6, n_classes=3, hidden=[8])


def _data(n: int = 40):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _outputs(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


def test_the_job_round_trips_with_every_part(tmp_path):
    X, y = _data()
    model = build_model(SPEC)
    ewc = EWC.from_model(model, X, y, lam=3.0, gamma=0.5, kind="true")
    buffer = ReservoirBuffer(capacity=16, n_features=6, seed=4)
    buffer.add(X, y, batch_id="old")
    settings = TrainSettings(steps=7, batch_size=5, lr=0.02, max_grad_norm=None)
    job = DistributedJob(
        model, X, y, settings, ewc=ewc, replay=buffer, replay_ratio=0.25, fisher_kind="sampled"
    )
    write_job(job, tmp_path)
    back = read_job(tmp_path)
    assert back.settings == settings and back.replay_ratio == 0.25
    assert back.fisher_kind == "sampled" and back.fisher_seed == 0
    assert torch.equal(back.X, X) and torch.equal(back.y, y)
    assert torch.equal(_outputs(back.model, X), _outputs(model, X))
    assert spec_of(back.model) == SPEC
    assert back.ewc is not None and (back.ewc.lam, back.ewc.gamma, back.ewc.kind) == (
        3.0,
        0.5,
        "true",
    )
    assert all(torch.equal(back.ewc.fisher[n], f) for n, f in ewc.fisher.items())
    assert back.replay is not None and back.replay.tensors()[2] == buffer.tensors()[2]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and all(p.suffix in {".json", ".safetensors"} for p in files), files


def test_a_lora_job_keeps_its_keys_and_only_the_adapter_trains(tmp_path):
    X, y = _data()
    model = attach_lora(build_model(SPEC), LoraSettings(r=2, alpha=4))
    with torch.no_grad():  # a non-zero adapter, so its weights must travel too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.1)
    write_job(DistributedJob(model, X, y, TrainSettings(steps=1)), tmp_path)
    back = read_job(tmp_path).model
    assert list(back.state_dict()) == list(model.state_dict())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in back.named_parameters() if p.requires_grad} == trainable
    assert trainable and all("lora_" in n for n in trainable)
    assert torch.equal(_outputs(back, X), _outputs(model, X))


def test_frozen_parameters_stay_frozen_on_the_ranks(tmp_path):
    X, y = _data()
    model = make_trainable(build_model(SPEC))
    model.layers[0].weight.requires_grad_(False)
    write_job(DistributedJob(model, X, y, None, fisher_kind="true"), tmp_path)
    back = read_job(tmp_path)
    assert back.settings is None
    assert not back.model.layers[0].weight.requires_grad
    assert back.model.classifier.weight.requires_grad


def test_a_model_without_a_spec_is_refused_with_what_to_do(tmp_path):
    X, y = _data()
    job = DistributedJob(nn.Linear(6, 3), X, y, TrainSettings(steps=1))
    with pytest.raises(ValueError, match=r"has none: build it with continual\.models\.build_model"):
        write_job(job, tmp_path)
    job.spec = ModelSpec(
        family="tests.unit.test_distributed_files:linear", n_features=6, n_classes=3
    )
    write_job(job, tmp_path)
    assert torch.equal(_outputs(read_job(tmp_path).model, X), _outputs(job.model, X))


def linear(spec: ModelSpec) -> nn.Module:
    """A model family for the test above."""
    return nn.Linear(spec.n_features, spec.n_classes)


def test_the_result_round_trips(tmp_path):
    state = {"a.weight": torch.randn(3, 2), "b": torch.arange(4)}
    fisher = {"a.weight": torch.rand(3, 2)}
    record = TrainResult(losses=[1.0, 0.5], steps=2, seconds=0.1, examples_seen=8, device="cpu")
    write_result(DistributedResult(state, record, fisher, 2), tmp_path)
    back = read_result(tmp_path)
    assert back.world_size == 2 and back.result == record
    assert list(back.state_dict) == list(state)
    assert all(torch.equal(back.state_dict[k], v) for k, v in state.items())
    assert back.fisher is not None and torch.equal(back.fisher["a.weight"], fisher["a.weight"])
    write_result(DistributedResult(state, None, None, 3), tmp_path)
    assert read_result(tmp_path).fisher is None and read_result(tmp_path).result is None


def test_tampered_files_fail_with_the_file_named(tmp_path):
    X, y = _data()
    write_job(DistributedJob(build_model(SPEC), X, y, TrainSettings(steps=1)), tmp_path)
    weights = tmp_path / MODEL_DIR / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(JobFileError, match=WEIGHTS_FILE):
        read_job(tmp_path)
    (tmp_path / DATA_FILE).unlink()
    with pytest.raises(JobFileError, match=DATA_FILE):
        read_job(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    write_job(DistributedJob(build_model(SPEC), X, y, TrainSettings(steps=1)), other)
    meta = json.loads((other / JOB_FILE).read_text())
    meta["settings"]["exec"] = "os.system"
    (other / JOB_FILE).write_text(json.dumps(meta))
    with pytest.raises(JobFileError, match="settings must be an object with keys among"):
        read_job(other)
    result = tmp_path / "result"
    result.mkdir()
    write_result(DistributedResult({"w": torch.ones(2)}, None, None, 2), result)
    (result / RESULT_TENSORS).write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(JobFileError, match=RESULT_TENSORS):
        read_result(result)
    (result / RESULT_FILE).unlink()
    with pytest.raises(JobFileError, match=RESULT_FILE):
        read_result(result)
