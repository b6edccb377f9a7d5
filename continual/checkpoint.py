"""Model checkpoints as plain files: `spec.json` + `model.safetensors` (+ optional `adapter/`).

Text families (`hf`, `hf-causal-lm`) are stored against their pretrained base: `model.safetensors`
holds only the state-dict entries that differ from the model `build_model(spec)` loads from
`hf_path` (built under a fixed seed, so even a freshly initialised head is reproducible), and
`base.json` (`continual.base_model.BaseReference`) records the base's path, the sha256 of its
files and a digest of the tensors taken from it. A LoRA version is then its head and adapter
(megabytes), a full fine-tune the weights it trained. Loading verifies both hashes first and
raises `CheckpointError` if the base is missing or changed, instead of predicting with a base
the version was never trained on.

A LoRA version saved with the registered version it was trained from (`parent=`) is stored
against that parent instead: `model.safetensors` holds what differs from the parent as it loads
(the refitted head), `parent.json` (`continual.lineage.ParentReference`) names the parent and
the sha256 of its files, and loading resolves the chain link by link (every parent's files
verified, then its own base or parent) up to the pretrained base. Chains are bounded by
`max_links`, after which a version is stored against the base again.

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
import math
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
from continual.files import atomic_write_bytes
from continual.lineage import (
    MAX_PARENT_LINKS,
    PARENT_FILE,
    ParentReference,
    ParentResolver,
    ParentSource,
    ParentVersionError,
    read_parent,
    reference_to,
    resolve_parent,
    verify_parent_files,
)
from continual.models import SPEC_ATTRIBUTE, TEXT_FAMILIES, ModelSpec, build_model

if TYPE_CHECKING:
    from peft import PeftModel

SPEC_FILE = "spec.json"
WEIGHTS_FILE = "model.safetensors"
ADAPTER_DIR = "adapter"
_REFERENCE_SEED = 0  # seeds the parts of a text model its base does not hold (the head)
_LINK_LIMIT = 16  # links followed on load at most (MAX_PARENT_LINKS is what saving writes)
_SUM_TOLERANCE = 1e-6  # relative: tensors taken from a parent as it loads now vs when saved


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


def _atomic_save_tensors(path: Path, tensors: dict[str, Tensor], family: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", "family": family})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_into(
    directory: Path,
    model: nn.Module,
    spec: ModelSpec,
    parent: ParentSource | None,
    parents: ParentResolver,
    max_links: int,
) -> None:
    """Write weights (and adapter, base or parent reference), then spec, into a directory."""
    adapter_dir = directory / ADAPTER_DIR
    peft_model = cast("PeftModel", model) if _is_peft(model) else None
    tensors = _plain_state_dict(model) if peft_model is None else _base_state_dict(peft_model)
    reference: BaseReference | ParentReference | None = None
    if spec.family in TEXT_FAMILIES:
        linked = None
        if parent is not None and peft_model is not None:
            linked = _delta_against_parent(tensors, spec, parent, parents, max_links)
        tensors, reference = linked or _delta_against_base(tensors, spec)
    _atomic_save_tensors(directory / WEIGHTS_FILE, tensors, spec.family)
    if peft_model is not None:
        from continual.lora import save_adapter

        save_adapter(peft_model, adapter_dir)
    else:
        # A stale adapter would be applied on top of these (already merged) weights on load.
        shutil.rmtree(adapter_dir, ignore_errors=True)
    _write_reference(directory, reference)
    text = json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(directory / SPEC_FILE, text.encode("utf-8"))


def _write_reference(directory: Path, reference: BaseReference | ParentReference | None) -> None:
    """`base.json` or `parent.json` (the other removed), or neither for complete weights."""
    for name, kind in ((BASE_FILE, BaseReference), (PARENT_FILE, ParentReference)):
        if isinstance(reference, kind):
            atomic_write_bytes(directory / name, reference.to_json().encode("utf-8"))
        else:
            (directory / name).unlink(missing_ok=True)


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


def _delta_against_parent(
    tensors: dict[str, Tensor],
    spec: ModelSpec,
    parent: ParentSource,
    parents: ParentResolver,
    max_links: int,
) -> tuple[dict[str, Tensor], ParentReference] | None:
    """The entries of `tensors` that differ from the parent as it loads, and the reference;
    None when the version should be stored against the base instead (the chain is long
    enough, or the parent is another architecture, e.g. the head grew a class)."""
    reference = reference_to(parent)
    if reference.depth > max_links:
        return None
    try:
        loaded, parent_spec = load_checkpoint(parent.directory, parents=parents)
    except CheckpointError as exc:
        raise CheckpointError(f"cannot store the version against its parent: {exc}") from exc
    built = _plain_state_dict(loaded)
    if parent_spec.hf_path != spec.hf_path or set(built) != set(tensors):
        return None
    if any(built[k].shape != v.shape or built[k].dtype != v.dtype for k, v in tensors.items()):
        return None
    stored = {k: v for k, v in tensors.items() if not _same(v, built[k])}
    from_parent = {k: built[k] for k in tensors if k not in stored}
    return stored, replace(
        reference,
        from_parent_tensors=len(from_parent),
        from_parent_sums={k: _sums(v) for k, v in sorted(from_parent.items())},
        stored_tensors=len(stored),
    )


def _sums(tensor: Tensor) -> list[float]:
    """[sum, sum of squares] in float64: a fingerprint that survives last-bit differences."""
    t = tensor.detach().to("cpu", torch.float64)
    return [float(t.sum()), float((t * t).sum())]


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    spec: ModelSpec,
    *,
    parent: ParentSource | None = None,
    parents: ParentResolver = resolve_parent,
    max_links: int = MAX_PARENT_LINKS,
) -> Path:
    """Save `model` and its spec as a checkpoint directory.

    A peft model is saved as base weights (`model.safetensors`) plus its adapter (`adapter/`);
    a plain model removes any stale `adapter/`. A text family stores only what differs from its
    pretrained base, plus `base.json` (module docstring) — or, for a LoRA model on a registered
    `parent` whose weights it left as they were, only what differs from that parent, plus
    `parent.json` (`continual.lineage`), unless the parent is `max_links` links from the base
    already. Other files in the directory are kept.

    Args:
        directory: checkpoint folder; created (atomically, via a temporary sibling) if missing.
        model: the model to save (plain module or peft model).
        spec: the spec `model` was built from.
        parent: the registered version `model` was trained from, if any.
        parents: how the parent's own parent is found when the parent is loaded to compare.
        max_links: the longest chain of parent references a version may start.

    Returns:
        The checkpoint directory.
    """
    directory = Path(directory)
    if directory.is_dir():
        _write_into(directory, model, spec, parent, parents, max_links)
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        _write_into(staging, model, spec, parent, parents, max_links)
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
    parents: ParentResolver = resolve_parent,
    _links: int = 0,
) -> tuple[nn.Module, ModelSpec]:
    """Rebuild a model from a checkpoint directory.

    Args:
        directory: folder written by `save_checkpoint`.
        map_location: device the model is moved to.
        adapter: what to do with an `adapter/` folder: "merge" it into the weights (a plain
            module that predicts like the saved peft model), "attach" it (a peft model), or
            "ignore" it (base weights only).
        parents: finds the checkpoint of a parent version (`parent.json`); by default the
            registry, through a verified cache (`continual.lineage.resolve_parent`).

    Returns:
        (model in eval mode, spec).

    Raises:
        CheckpointError: missing/invalid spec or weights, truncated file, missing or
            unexpected keys, shape mismatch, an unreadable adapter, or a base or parent
            version that is missing or changed.
    """
    directory = Path(directory)
    spec = read_spec(directory)
    parent = _parent_reference(directory)
    if parent is not None:
        model = _load_on_parent(directory, spec, parent, parents, _links)
    else:
        model = _load_on_base(directory, spec)
    adapter_dir = directory / ADAPTER_DIR
    if adapter != "ignore" and adapter_dir.is_dir():
        model = _apply_adapter(model, adapter_dir, merge=adapter == "merge")
    return model.to(map_location).eval(), spec


def _load_on_base(directory: Path, spec: ModelSpec) -> nn.Module:
    """Complete weights, or the stored tensors over the verified pretrained base."""
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
    return model


def _parent_reference(directory: Path) -> ParentReference | None:
    try:
        return read_parent(directory)
    except ParentVersionError as exc:
        raise CheckpointError(str(exc)) from exc


def _load_on_parent(
    directory: Path,
    spec: ModelSpec,
    reference: ParentReference,
    parents: ParentResolver,
    links: int,
) -> nn.Module:
    """The parent version loaded (recursively, every link verified), with this version's
    stored tensors over it."""
    if links >= _LINK_LIMIT:
        raise CheckpointError(f"{directory}: more than {_LINK_LIMIT} parent links; refusing")
    try:
        parent_dir = parents(reference)
        verify_parent_files(reference, parent_dir)  # whatever the resolver returned
    except ParentVersionError as exc:
        raise CheckpointError(f"{directory}: {exc}") from exc
    try:
        model, _ = load_checkpoint(parent_dir, parents=parents, _links=links + 1)
    except CheckpointError as exc:
        raise CheckpointError(f"{directory}: parent {reference.uri}: {exc}") from exc
    weights_path = directory / WEIGHTS_FILE
    tensors = _read_tensors(weights_path)
    _check_parent_delta(weights_path, model.state_dict(), tensors, reference)
    model.load_state_dict(tensors, strict=False)
    setattr(model, SPEC_ATTRIBUTE, spec)
    return model


def _check_parent_delta(
    path: Path, expected: dict[str, Tensor], found: dict[str, Tensor], reference: ParentReference
) -> None:
    """Stored entries must be the model's; the rest must be what was taken from the parent."""
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys {unexpected[:10]} for its parent")
    _check_keys(path, {k: v for k, v in expected.items() if k in found}, found)
    from_parent = {k: v for k, v in expected.items() if k not in found}
    recorded = reference.from_parent_sums
    differ = sorted(set(from_parent) ^ set(recorded))
    differ += [
        k
        for k in sorted(set(from_parent) & set(recorded))
        if not _close(from_parent[k], recorded[k])
    ]
    if differ:
        raise CheckpointError(
            f"{path}: the tensors this version takes from its parent {reference.uri} load "
            f"differently than when it was saved ({', '.join(differ[:5])}); the parent's files "
            "match, so its base or the code that merges adapters (peft, torch) changed"
        )


def _close(tensor: Tensor, recorded: list[float]) -> bool:
    total, squares = _sums(tensor)
    bound = _SUM_TOLERANCE * (math.sqrt(abs(recorded[1]) * max(tensor.numel(), 1)) + 1e-12)
    return abs(total - recorded[0]) <= bound and abs(squares - recorded[1]) <= _SUM_TOLERANCE * (
        abs(recorded[1]) + 1e-12
    )


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
