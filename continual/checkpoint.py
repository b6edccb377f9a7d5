"""Model checkpoints as plain files: `spec.json` + `model.safetensors` (+ optional `adapter/`).

Text families (`hf`, `hf-causal-lm`) are stored against their pretrained base: `model.safetensors`
holds only the state-dict entries that differ from the model `build_model(spec)` loads from
`hf_path` (built under a fixed seed, so even a freshly initialised head is reproducible), and
`base.json` (`continual.base_model.BaseReference`) records the base's path, the sha256 of its
files and a digest of the tensors taken from it. A LoRA version is then its head and adapter
(megabytes), a full fine-tune the weights it trained. Loading verifies both hashes first and
raises `CheckpointError` if the base is missing or changed, instead of predicting with a base
the version was never trained on.

No pickle: a checkpoint is rebuilt from its spec with `build_model` and its tensors loaded
strictly, so a checkpoint from another architecture fails loudly instead of half-loading.

Writing is crash-safe per file: each file is written to a temporary name in the same folder and
moved into place with `os.replace`, weights before spec. A new checkpoint directory is written
in full to a temporary sibling and renamed, so it either exists complete or not at all. An
existing directory is updated file by file (never replaced wholesale) because other components
keep their own files beside the model (`ewc.safetensors`, `replay/`, `retention.parquet`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from continual.base_model import (
    BASE_FILE,
    BaseModelError,
    BaseReference,
    read_reference,
    reference_for,
    verify_base,
)
from continual.models import TEXT_FAMILIES, ModelSpec, build_model

if TYPE_CHECKING:
    from peft import PeftModel

SPEC_FILE = "spec.json"
WEIGHTS_FILE = "model.safetensors"
ADAPTER_DIR = "adapter"
_REFERENCE_SEED = 0  # seeds the parts of a text model its base does not hold (the head)


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
    """Write weights (and adapter, base reference), then spec, into an existing directory."""
    adapter_dir = directory / ADAPTER_DIR
    peft_model = cast("PeftModel", model) if _is_peft(model) else None
    tensors = _plain_state_dict(model) if peft_model is None else _base_state_dict(peft_model)
    reference = None
    if spec.family in TEXT_FAMILIES:
        tensors, reference = _delta_against_base(tensors, spec)
    _atomic_save_tensors(directory / WEIGHTS_FILE, tensors, spec.family)
    if peft_model is not None:
        from continual.lora import save_adapter

        save_adapter(peft_model, adapter_dir)
    else:
        # A stale adapter would be applied on top of these (already merged) weights on load.
        shutil.rmtree(adapter_dir, ignore_errors=True)
    if reference is None:
        (directory / BASE_FILE).unlink(missing_ok=True)  # these weights are complete
    else:
        _atomic_write_bytes(directory / BASE_FILE, reference.to_json().encode("utf-8"))
    text = json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n"
    _atomic_write_bytes(directory / SPEC_FILE, text.encode("utf-8"))


def reference_model(spec: ModelSpec) -> nn.Module:
    """The model `spec` describes with nothing but its base: `build_model` under a fixed seed,
    so parts the base does not hold (a new head) come out the same on every build."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_REFERENCE_SEED)
        return build_model(spec)


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of `tensors` (sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").reshape(-1).contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(tensors[name].shape)}\0".encode())
        digest.update(t.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _same(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _delta_against_base(
    tensors: dict[str, Tensor], spec: ModelSpec
) -> tuple[dict[str, Tensor], BaseReference]:
    """The entries of `tensors` that differ from the base-only model, and the base reference.

    Raises:
        CheckpointError: the base cannot be read, or `tensors` is not this spec's architecture.
    """
    assert spec.hf_path is not None  # guaranteed for text families by ModelSpec validation
    try:
        reference = reference_for(spec.hf_path)
        built = {k: v.detach().to("cpu") for k, v in reference_model(spec).state_dict().items()}
    except (BaseModelError, ValueError, FileNotFoundError) as exc:
        raise CheckpointError(f"cannot store the version against its base: {exc}") from exc
    _check_keys(Path(spec.hf_path), built, tensors)
    stored = {k: v for k, v in tensors.items() if not _same(v, built[k])}
    from_base = {k: built[k] for k in tensors if k not in stored}
    return stored, replace(
        reference,
        from_base_sha256=tensors_sha256(from_base),
        stored_tensors=len(stored),
        from_base_tensors=len(from_base),
    )


def save_checkpoint(directory: str | Path, model: nn.Module, spec: ModelSpec) -> Path:
    """Save `model` and its spec as a checkpoint directory.

    A peft model is saved as base weights (`model.safetensors`) plus its adapter (`adapter/`);
    a plain model removes any stale `adapter/`. A text family stores only what differs from its
    pretrained base, plus `base.json` (module docstring). Other files in the directory are kept.

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
    reference = _verified_reference(directory)
    weights_path = directory / WEIGHTS_FILE
    tensors = _read_tensors(weights_path)
    try:
        model = build_model(spec) if reference is None else reference_model(spec)
    except (ValueError, FileNotFoundError) as exc:
        raise CheckpointError(f"{directory / SPEC_FILE}: cannot build the model: {exc}") from exc
    if reference is None:
        _check_keys(weights_path, model.state_dict(), tensors)
    else:
        _check_delta(weights_path, model.state_dict(), tensors, reference)
    model.load_state_dict(tensors, strict=reference is None)
    adapter_dir = directory / ADAPTER_DIR
    if adapter != "ignore" and adapter_dir.is_dir():
        model = _apply_adapter(model, adapter_dir, merge=adapter == "merge")
    return model.to(map_location).eval(), spec


def _verified_reference(directory: Path) -> BaseReference | None:
    """The checkpoint's base reference, its base verified; None for complete weights."""
    try:
        reference = read_reference(directory)
        if reference is not None:
            verify_base(reference)
    except BaseModelError as exc:
        raise CheckpointError(f"{directory}: {exc}") from exc
    return reference


def _check_delta(
    path: Path, expected: dict[str, Tensor], found: dict[str, Tensor], reference: BaseReference
) -> None:
    """Stored entries must be the model's; the rest must be exactly what was taken from the base."""
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{path}: does not match the spec's architecture: unexpected keys {unexpected[:10]}"
        )
    _check_keys(path, {k: v for k, v in expected.items() if k in found}, found)
    from_base = {k: v for k, v in expected.items() if k not in found}
    if tensors_sha256(from_base) != reference.from_base_sha256:
        raise CheckpointError(
            f"{path}: the {len(from_base)} tensors this version takes from its base "
            f"{reference.hf_path!r} load differently than when it was saved (the base files "
            "match; a different transformers/torch version may build them differently)"
        )


def _apply_adapter(model: nn.Module, adapter_dir: Path, *, merge: bool) -> nn.Module:
    from continual.lora import load_adapter, merge_adapter

    try:
        peft_model = load_adapter(model, adapter_dir)
    except (FileNotFoundError, ValueError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"{adapter_dir}: cannot load the adapter ({exc})") from exc
    return merge_adapter(peft_model) if merge else peft_model
