"""The torchrun job and its result as plain files: safetensors for tensors, JSON for the rest.

Why not pickle: a pickle runs code when it is read, so whoever could write into the job folder
would run code in every rank, and through the result file in the flow's own process. Here
nothing is unpickled: the model is rebuilt from its `ModelSpec` (`build_model`, as a checkpoint
is), a LoRA adapter from its peft config (JSON), and every tensor is loaded from safetensors
strictly (a wrong key or shape fails loudly).

A job folder (written by the launcher, read by every rank):
    job.json           settings, replay ratio, Fisher kind and seed, trainable parameters
    data.safetensors   X, y
    model/             spec.json, model.safetensors (the whole state dict), adapter/ if LoRA
    ewc.safetensors    the EWC state (`EWC.save`), when there is one
    replay/            the replay buffer (`ReservoirBuffer.save`), when there is one
The result (written by rank 0 into the same folder; result.json is moved into place last, so a
result.json means a complete result):
    result.safetensors   state.<name> (weights) and fisher.<name>
    result.json          the TrainResult fields, the world size, the tensor names in order
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from continual.ewc import EWC
from continual.files import atomic_write_text
from continual.fisher_kinds import FisherKind
from continual.models import ModelSpec, build_model, spec_of
from continual.replay import ReservoirBuffer
from continual.training import TrainResult, TrainSettings

if TYPE_CHECKING:
    from peft import PeftModel


@dataclass
class DistributedJob:
    """What every rank runs: train `model` on its shard of (X, y), then optionally its Fisher.

    Attributes:
        model: the model to train; every rank rebuilds it from its spec and weights.
        X: every input row; each rank takes `shard_rows` of them.
        y: class indices for X.
        settings: optimiser settings of the single-process run (None: Fisher only).
        ewc: the EWC penalty, applied by every rank after its DDP-synchronised step.
        replay: the replay buffer; each rank samples it with its own seed.
        replay_ratio: share of every batch taken from `replay`.
        fisher_kind: after training, estimate this kind of Fisher on (X, y) (None: skip).
        fisher_seed: seeds the label draws of kind "sampled" (global, not per rank).
        spec: the spec `model` was built from (None: the one `build_model` put on the model).
    """

    model: nn.Module
    X: Tensor
    y: Tensor
    settings: TrainSettings | None
    ewc: EWC | None = None
    replay: ReservoirBuffer | None = None
    replay_ratio: float = 0.0
    fisher_kind: FisherKind | None = None
    fisher_seed: int = 0
    spec: ModelSpec | None = None


@dataclass
class DistributedResult:
    """What rank 0 writes: the trained weights, the run's record and the Fisher."""

    state_dict: dict[str, Tensor]
    result: TrainResult | None
    fisher: dict[str, Tensor] | None
    world_size: int


JOB_FILE = "job.json"
DATA_FILE = "data.safetensors"
MODEL_DIR = "model"
SPEC_FILE = "spec.json"
WEIGHTS_FILE = "model.safetensors"
ADAPTER_DIR = "adapter"
EWC_FILE = "ewc.safetensors"
REPLAY_DIR = "replay"
RESULT_FILE = "result.json"
RESULT_TENSORS = "result.safetensors"


class JobFileError(ValueError):
    """A job or result folder is incomplete or inconsistent; the message names the file."""


def _is_peft(model: nn.Module) -> bool:
    return type(model).__module__.startswith("peft.")


def _plain(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous, unshared copies (safetensors refuses tensors sharing storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Readers (the other ranks, the launcher) see all of it or none."""
    atomic_write_text(path, json.dumps(data))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise JobFileError(f"{path}: missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise JobFileError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise JobFileError(f"{path}: expected a JSON object")
    return data


def _read_tensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise JobFileError(f"{path}: missing")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise JobFileError(f"{path}: unreadable safetensors file ({exc})") from exc


def write_model(model: nn.Module, spec: ModelSpec, directory: Path) -> None:
    """Spec, whole state dict and (for a peft model) adapter config of `model`, in `directory`."""
    directory.mkdir(parents=True, exist_ok=False)
    (directory / SPEC_FILE).write_text(json.dumps(spec.to_dict()), encoding="utf-8")
    save_file(_plain(model.state_dict()), str(directory / WEIGHTS_FILE))
    if _is_peft(model):
        from continual.lora import save_adapter

        save_adapter(cast("PeftModel", model), directory / ADAPTER_DIR)


def read_model(directory: Path, trainable: list[str]) -> nn.Module:
    """Rebuild the model `write_model` wrote; only the parameters named in `trainable` train."""
    try:
        spec = ModelSpec.from_dict(_read_json(directory / SPEC_FILE))
    except (TypeError, ValueError) as exc:
        raise JobFileError(f"{directory / SPEC_FILE}: {exc}") from exc
    model = build_model(spec)
    if (directory / ADAPTER_DIR).is_dir():
        from continual.lora import load_adapter

        model = load_adapter(model, directory / ADAPTER_DIR, trainable=True)
    try:
        model.load_state_dict(_read_tensors(directory / WEIGHTS_FILE), strict=True)
    except RuntimeError as exc:
        raise JobFileError(f"{directory / WEIGHTS_FILE}: does not fit the spec ({exc})") from exc
    wanted = set(trainable)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in wanted)
    return model


def write_job(job: DistributedJob, directory: Path) -> None:
    """Lay `job` out in `directory` (an existing, empty, private folder).

    Raises:
        ValueError: the model's spec is unknown (neither `job.spec` nor set by `build_model`).
    """
    spec = job.spec or spec_of(job.model)
    if spec is None:
        raise ValueError(
            f"distributed training rebuilds the model on every rank from its ModelSpec, and this "
            f"{type(job.model).__name__} has none: build it with continual.models.build_model "
            "or pass DistributedJob(spec=...)"
        )
    write_model(job.model, spec, directory / MODEL_DIR)
    save_file({"X": job.X.contiguous(), "y": job.y.contiguous()}, str(directory / DATA_FILE))
    if job.ewc is not None:
        job.ewc.save(directory / EWC_FILE, metadata=job.ewc.metadata)
    if job.replay is not None:
        job.replay.save(directory / REPLAY_DIR)
    trainable = [n for n, p in job.model.named_parameters() if p.requires_grad]
    _write_json(
        directory / JOB_FILE,
        {
            "settings": None if job.settings is None else asdict(job.settings),
            "replay_ratio": job.replay_ratio,
            "fisher_kind": job.fisher_kind,
            "fisher_seed": job.fisher_seed,
            "trainable": trainable,
        },
    )


def _settings(data: dict[str, Any] | None, path: Path) -> TrainSettings | None:
    if data is None:
        return None
    known = {f.name for f in fields(TrainSettings)}
    if not isinstance(data, dict) or set(data) - known:
        raise JobFileError(f"{path}: settings must be an object with keys among {sorted(known)}")
    return TrainSettings(**data)


def read_job(directory: Path) -> DistributedJob:
    """Read what `write_job` wrote (on a rank).

    Raises:
        JobFileError: a file is missing, unreadable or does not fit the others.
    """

    meta = _read_json(directory / JOB_FILE)
    data = _read_tensors(directory / DATA_FILE)
    if set(data) != {"X", "y"}:
        raise JobFileError(f"{directory / DATA_FILE}: expected tensors X and y, got {sorted(data)}")
    ewc_file, replay_dir = directory / EWC_FILE, directory / REPLAY_DIR
    return DistributedJob(
        model=read_model(directory / MODEL_DIR, list(meta.get("trainable", []))),
        X=data["X"],
        y=data["y"],
        settings=_settings(meta.get("settings"), directory / JOB_FILE),
        ewc=EWC.load(ewc_file) if ewc_file.is_file() else None,
        replay=ReservoirBuffer.load(replay_dir) if replay_dir.is_dir() else None,
        replay_ratio=float(meta.get("replay_ratio", 0.0)),
        fisher_kind=cast("FisherKind | None", meta.get("fisher_kind")),
        fisher_seed=int(meta.get("fisher_seed", 0)),
    )


def write_result(outcome: DistributedResult, directory: Path) -> None:
    """Rank 0's result: tensors first, then result.json (its presence means complete)."""
    tensors = {f"state.{k}": v for k, v in _plain(outcome.state_dict).items()}
    tensors.update({f"fisher.{k}": v for k, v in _plain(outcome.fisher or {}).items()})
    fd, tmp = tempfile.mkstemp(prefix=f".{RESULT_TENSORS}.", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, directory / RESULT_TENSORS)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _write_json(
        directory / RESULT_FILE,
        {
            "result": None if outcome.result is None else asdict(outcome.result),
            "world_size": outcome.world_size,
            "state": list(outcome.state_dict),
            "fisher": None if outcome.fisher is None else list(outcome.fisher),
        },
    )


def read_result(directory: Path) -> DistributedResult:
    """Read what `write_result` wrote (in the launcher).

    Raises:
        JobFileError: a file is missing, unreadable, or names tensors the other lacks.
    """

    meta = _read_json(directory / RESULT_FILE)
    tensors = _read_tensors(directory / RESULT_TENSORS)
    try:
        state = {name: tensors.pop(f"state.{name}") for name in meta["state"]}
        names = meta["fisher"]
        fisher = None if names is None else {n: tensors.pop(f"fisher.{n}") for n in names}
        result = None if meta["result"] is None else TrainResult(**meta["result"])
    except (KeyError, TypeError) as exc:
        raise JobFileError(f"{directory / RESULT_FILE}: does not fit its tensors ({exc})") from exc
    if tensors:
        raise JobFileError(
            f"{directory / RESULT_TENSORS}: unexpected tensors {sorted(tensors)[:5]}"
        )
    return DistributedResult(state, result, fisher, int(meta["world_size"]))
