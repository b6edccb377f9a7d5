"""An EWC state on disk: one safetensors file per model version (`EWC.save` / `EWC.load`).

Layout: `fisher.<name>` (the online accumulator), `anchor.<name>` (θ*, left out when it is the
weights saved beside the file: metadata `anchor = model`), `own.<name>` (the version's own
Fisher), and metadata: the format, λ, γ, mode, Fisher kind, normalisation and the tensor names
in model order. A version stored against a parent version may take accumulator entries from the
parent's state (format evergreen.ewc/3): those equal to the parent's (`from_parent`) and those
equal to γ·F_parent + F_own (`parent_plus_own`), checked against the parent file's sha256 on
load. Writes are atomic (temp file, fsync, rename): never a half-written state.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

FORMAT = "evergreen.ewc/2"  # /2 adds own.<name> tensors and mode/kind/normalize metadata
# /3: some Fisher entries are the parent version's (by reference): only written when they are,
# so a state without references stays readable by releases that know /2
FORMAT_WITH_PARENT = "evergreen.ewc/3"
READABLE_FORMATS = ("evergreen.ewc/1", FORMAT, FORMAT_WITH_PARENT)
RESERVED_METADATA = (
    "format",
    "lambda",
    "gamma",
    "names",
    "own_names",
    "mode",
    "fisher_kind",
    "normalize",
    "fisher_scale",
    "parent_sha256",
    "from_parent",
    "parent_plus_own",
)


class EWCStateError(ValueError):
    """A saved EWC state is missing, truncated, corrupt or inconsistent."""


@dataclass(frozen=True)
class ParentFisher:
    """The Fisher accumulator of the version a state is stored against, resolved in full.

    Attributes:
        fisher: the parent's accumulator as it loads (its own references resolved).
        sha256: digest of the parent's EWC file: the one its checkpoint manifest records.
    """

    fisher: dict[str, Tensor]
    sha256: str


ParentFisherSource = Callable[[], ParentFisher]


@dataclass(frozen=True)
class StoredEWC:
    """The tensors of an EWC state: the accumulator, the anchor, the version's own Fisher (None
    when unknown) and the decay γ that relates them (F = γ·F_parent + F_own)."""

    fisher: dict[str, Tensor]
    anchor: dict[str, Tensor]
    own: dict[str, Tensor] | None
    gamma: float


def write_state(
    path: Path,
    state: StoredEWC,
    settings: dict[str, str],
    metadata: dict[str, str],
    *,
    anchor_in_model: bool = False,
    parent: ParentFisher | None = None,
) -> None:
    """Write `fisher.<name>`/`anchor.<name>`/`own.<name>` tensors + metadata (`settings`, the
    EWC's λ, γ, mode, kind and normalisation, and the caller's `metadata`) to safetensors,
    atomically. `anchor_in_model`: the anchor is the weights saved beside this file (check
    with `EWC.anchored_at`); it is not written, and loading takes it from the model's
    parameters — for a text model that is the size of the trained weights saved.

    `parent`: the accumulator of the version this one is stored against. Entries equal to
    the parent's are not written (metadata `from_parent`), nor are those that equal
    γ·F_parent + F_own computed as `EWC.consolidate` does (`parent_plus_own`); loading then
    needs the parent's Fisher, checked against `parent_sha256`. Written as format
    evergreen.ewc/3 only when something is taken from the parent.

    Raises:
        ValueError: `metadata` uses a reserved key or a value that is not a string.
    """
    clash = [k for k in metadata if k in RESERVED_METADATA]
    if clash or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"EWC metadata must map str->str without keys {RESERVED_METADATA}")
    meta = {
        **metadata,
        "format": FORMAT,
        **settings,
        "names": json.dumps(list(state.fisher)),  # safetensors sorts keys; keep model order
    }
    stored = state.fisher
    if parent is not None:
        same, derived = _taken_from(state, parent.fisher)
        if same or derived:
            meta.update(
                format=FORMAT_WITH_PARENT,
                parent_sha256=parent.sha256,
                from_parent=json.dumps(same),
                parent_plus_own=json.dumps(derived),
            )
            skip = {*same, *derived}
            stored = {n: f for n, f in state.fisher.items() if n not in skip}
    groups = {"fisher": stored}
    if anchor_in_model:
        meta["anchor"] = "model"
    else:
        groups["anchor"] = state.anchor
    if state.own is not None:
        meta["own_names"] = json.dumps(list(state.own))
        groups["own"] = state.own
    tensors = {
        f"{prefix}.{n}": t.detach().cpu().contiguous()
        for prefix, group in groups.items()
        for n, t in group.items()
    }
    _write_atomically(path, tensors, meta)


def _taken_from(state: StoredEWC, parent: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """Names whose accumulator is bit-for-bit the parent's, and those that are
    γ·F_parent + F_own as loading recomputes them (`plus_own`)."""
    same, derived = [], []
    for name, f in state.fisher.items():
        old = parent.get(name)
        if old is None or old.shape != f.shape or old.dtype != f.dtype:
            continue
        if torch.equal(f, old.to(f.device)):
            same.append(name)
        elif (
            state.own is not None
            and name in state.own
            and torch.equal(f, plus_own(state.own[name], old, state.gamma).to(f.device))
        ):
            derived.append(name)
    return same, derived


def read_state(
    path: Path,
    *,
    model_parameters: dict[str, Tensor] | None = None,
    parent: ParentFisherSource | None = None,
) -> tuple[dict[str, str], StoredEWC]:
    """The metadata and tensors of a state written by `write_state` (`EWC.load` builds the EWC
    from them; its docstring says what the arguments supply).

    Raises:
        FileNotFoundError, EWCStateError: as `EWC.load`.
    """
    meta, tensors = _read_state_file(path)
    try:
        names = json.loads(meta["names"])
        own_names = json.loads(meta["own_names"]) if "own_names" in meta else None
        own = None if own_names is None else {n: tensors.pop(f"own.{n}") for n in own_names}
        fisher = _fisher_of(path, meta, names, tensors, own, parent)
        anchor = _anchor_of(path, meta, names, tensors, model_parameters)
    except (KeyError, ValueError, TypeError) as exc:
        raise EWCStateError(f"{path}: tensors do not match the stored names: {exc}") from exc
    if tensors:
        raise EWCStateError(f"{path}: unexpected tensors {sorted(tensors)[:5]}")
    gamma = float(meta.get("gamma", 1.0))
    return meta, StoredEWC(fisher, anchor, own, gamma)


def read_fisher(path: str | Path, parent: ParentFisherSource | None = None) -> dict[str, Tensor]:
    """Only the accumulator of a saved state (its parent's entries resolved): what a child
    stored against this version takes entries from. Needs no model weights.

    Raises:
        FileNotFoundError, EWCStateError: as `EWC.load`.
    """
    path = Path(path)
    meta, tensors = _read_state_file(path)
    try:
        names = json.loads(meta["names"])
        own_names = json.loads(meta["own_names"]) if "own_names" in meta else []
        own = {n: tensors[f"own.{n}"] for n in own_names}
        return _fisher_of(path, meta, names, tensors, own, parent)
    except (KeyError, ValueError, TypeError) as exc:
        raise EWCStateError(f"{path}: tensors do not match the stored names: {exc}") from exc


def _read_state_file(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    if not path.is_file():
        raise FileNotFoundError(f"EWC state {path} not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta: dict[str, str] = handle.metadata() or {}
            tensors: dict[str, Tensor] = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except Exception as exc:
        raise EWCStateError(f"{path} is not a readable safetensors file: {exc}") from exc
    if meta.get("format") not in READABLE_FORMATS:
        raise EWCStateError(
            f"{path}: metadata format is {meta.get('format')!r}, not one of {READABLE_FORMATS}"
        )
    return meta, tensors


def plus_own(own: Tensor, parent: Tensor, gamma: float) -> Tensor:
    """γ·F_parent + F_own: the one expression `EWC.consolidate` accumulates with and loading
    recomputes a `parent_plus_own` entry with (they must agree bit for bit)."""
    return torch.add(own, parent.to(own.device, own.dtype), alpha=gamma)


def _fisher_of(
    path: Path,
    meta: dict[str, str],
    names: list[str],
    tensors: dict[str, Tensor],
    own: dict[str, Tensor] | None,
    parent: ParentFisherSource | None,
) -> dict[str, Tensor]:
    """The accumulator: stored entries, and those taken from the parent (format /3)."""
    same = json.loads(meta.get("from_parent", "[]"))
    derived = json.loads(meta.get("parent_plus_own", "[]"))
    if not same and not derived:
        return {n: tensors.pop(f"fisher.{n}") for n in names}
    if parent is None:
        raise EWCStateError(
            f"{path}: {len(same) + len(derived)} Fisher entries are its parent version's; "
            "load it with the parent (tasks.state.read_state resolves it)"
        )
    source = parent()
    if source.sha256 != meta.get("parent_sha256"):
        raise EWCStateError(
            f"{path}: its Fisher references the parent's EWC state with sha256 "
            f"{str(meta.get('parent_sha256'))[:12]}…, but the parent's file is "
            f"{source.sha256[:12]}…: the parent version changed; restore it to load this one"
        )
    taken = set(same) | set(derived)
    fisher = {}
    for name in names:
        if name not in taken:
            fisher[name] = tensors.pop(f"fisher.{name}")
        elif name in same:
            fisher[name] = source.fisher[name]  # copied by EWC()
        else:
            if own is None:
                raise EWCStateError(f"{path}: {name!r} is γ·F_parent + F_own without F_own")
            fisher[name] = plus_own(own[name], source.fisher[name], float(meta["gamma"]))
    return fisher


def _anchor_of(
    path: Path,
    meta: dict[str, str],
    names: list[str],
    tensors: dict[str, Tensor],
    model_parameters: dict[str, Tensor] | None,
) -> dict[str, Tensor]:
    """The stored anchor, or, for a state saved with `anchor_in_model`, the model's weights."""
    if meta.get("anchor") != "model":
        return {n: tensors.pop(f"anchor.{n}") for n in names}
    if model_parameters is None:
        raise EWCStateError(f"{path}: the anchor is the model's weights; pass model_parameters")
    missing = [n for n in names if n not in model_parameters]
    if missing:
        raise EWCStateError(f"{path}: the model has no parameters {missing[:5]} for the anchor")
    return {n: model_parameters[n].detach().clone() for n in names}


def _write_atomically(path: Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
    """safetensors file via a fsynced temp file + rename: never a half-written state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
