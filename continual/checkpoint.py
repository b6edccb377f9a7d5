"""Model checkpoints as plain files: `spec.json` + `model.safetensors` (+ optional `adapter/`).

No pickle: a checkpoint is rebuilt from its spec with `build_model` and its tensors loaded
strictly, so a checkpoint from another architecture fails loudly instead of half-loading.

Writing is crash-safe per file: each file is written to a temporary name in the same folder and
moved into place with `os.replace`, weights before spec. A new checkpoint directory is written
in full to a temporary sibling and renamed, so it either exists complete or not at all. An
existing directory is updated file by file (never replaced wholesale) because other components
keep their own files beside the model (`ewc.safetensors`, `replay/`, `retention.parquet`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from continual.models import ModelSpec, build_model

if TYPE_CHECKING:
    from peft import PeftModel

SPEC_FILE = "spec.json"
WEIGHTS_FILE = "model.safetensors"
ADAPTER_DIR = "adapter"


class CheckpointError(Exception):
    """A checkpoint cannot be read: the message names the file and what is wrong."""


def _is_peft(model: nn.Module) -> bool:
    return type(model).__module__.startswith("peft.")


def _plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """CPU, contiguous, unshared copies (safetensors rejects tensors sharing storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def _base_state_dict(peft_model: PeftModel) -> dict[str, Tensor]:
    """The base model's weights without the LoRA layers, under the base model's own keys."""
    import copy

    return _plain_state_dict(copy.deepcopy(peft_model).unload())


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_save_tensors(path: Path, tensors: dict[str, Tensor], family: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", "family": family})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_into(directory: Path, model: nn.Module, spec: ModelSpec) -> None:
    """Write weights (and adapter), then spec, into an existing directory."""
    adapter_dir = directory / ADAPTER_DIR
    if _is_peft(model):
        from continual.lora import save_adapter

        peft_model = cast("PeftModel", model)
        _atomic_save_tensors(directory / WEIGHTS_FILE, _base_state_dict(peft_model), spec.family)
        save_adapter(peft_model, adapter_dir)
    else:
        # A stale adapter would be applied on top of these (already merged) weights on load.
        shutil.rmtree(adapter_dir, ignore_errors=True)
        _atomic_save_tensors(directory / WEIGHTS_FILE, _plain_state_dict(model), spec.family)
    text = json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n"
    _atomic_write_bytes(directory / SPEC_FILE, text.encode("utf-8"))


def save_checkpoint(directory: str | Path, model: nn.Module, spec: ModelSpec) -> Path:
    """Save `model` and its spec as a checkpoint directory.

    A peft model is saved as base weights (`model.safetensors`) plus its adapter (`adapter/`);
    a plain model removes any stale `adapter/`. Other files in the directory are kept.

    Args:
        directory: checkpoint folder; created (atomically, via a temporary sibling) if missing.
        model: the model to save (plain module or peft model).
        spec: the spec `model` was built from.

    Returns:
        The checkpoint directory.
    """
    directory = Path(directory)
    if directory.is_dir():
        _write_into(directory, model, spec)
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        _write_into(staging, model, spec)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def read_spec(directory: str | Path) -> ModelSpec:
    """Read a checkpoint's `spec.json`.

    Raises:
        CheckpointError: the file is missing, not JSON, or not a valid spec.
    """
    path = Path(directory) / SPEC_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; is {directory} a checkpoint directory?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    try:
        return ModelSpec.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def _read_tensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the checkpoint has no weights)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({exc})") from exc


def _check_keys(path: Path, expected: dict[str, Tensor], found: dict[str, Tensor]) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not match the spec's architecture: missing keys {missing[:10]}, "
            f"unexpected keys {unexpected[:10]}"
        )
    wrong = [
        f"{k}: file {tuple(found[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if found[k].shape != v.shape
    ]
    if wrong:
        raise CheckpointError(f"{path}: shape mismatch: {'; '.join(wrong[:10])}")


def load_checkpoint(
    directory: str | Path,
    *,
    map_location: str | torch.device = "cpu",
    adapter: Literal["merge", "attach", "ignore"] = "merge",
) -> tuple[nn.Module, ModelSpec]:
    """Rebuild a model from a checkpoint directory.

    Args:
        directory: folder written by `save_checkpoint`.
        map_location: device the model is moved to.
        adapter: what to do with an `adapter/` folder: "merge" it into the weights (a plain
            module that predicts like the saved peft model), "attach" it (a peft model), or
            "ignore" it (base weights only).

    Returns:
        (model in eval mode, spec).

    Raises:
        CheckpointError: missing/invalid spec or weights, truncated file, missing or
            unexpected keys, shape mismatch, or an unreadable adapter.
    """
    directory = Path(directory)
    spec = read_spec(directory)
    weights_path = directory / WEIGHTS_FILE
    tensors = _read_tensors(weights_path)
    try:
        model = build_model(spec)
    except (ValueError, FileNotFoundError) as exc:
        raise CheckpointError(f"{directory / SPEC_FILE}: cannot build the model: {exc}") from exc
    _check_keys(weights_path, model.state_dict(), tensors)
    model.load_state_dict(tensors, strict=True)
    adapter_dir = directory / ADAPTER_DIR
    if adapter != "ignore" and adapter_dir.is_dir():
        model = _apply_adapter(model, adapter_dir, merge=adapter == "merge")
    return model.to(map_location).eval(), spec


def _apply_adapter(model: nn.Module, adapter_dir: Path, *, merge: bool) -> nn.Module:
    from continual.lora import load_adapter, merge_adapter

    try:
        peft_model = load_adapter(model, adapter_dir)
    except (FileNotFoundError, ValueError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"{adapter_dir}: cannot load the adapter ({exc})") from exc
    return merge_adapter(peft_model) if merge else peft_model
