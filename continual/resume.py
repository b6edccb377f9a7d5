"""Checkpoint and resume a training run: the loop's whole state in one safetensors file.

A long fine-tune killed mid-run (SIGKILL, node pre-emption) would otherwise start over.
`continual.training.train` takes a `Checkpointing` and, every `every_steps` steps and/or
`every_seconds` seconds (and once at the end), writes everything the rest of the run depends
on, so that a resumed run ends with the same weights, bit for bit, as one never interrupted:

- the trainable parameters and the buffers (frozen parameters never change during a run);
- the AdamW state (moments and step counts; its hyper-parameters come from the settings);
- the batch-order / replay-sampling generator, and where the current epoch's order stands
  (the generator state the epoch's order was drawn from, and how many batches of it were used);
- the global torch RNG inside the loop (dropout), and CUDA's when training there;
- the step, the losses so far and the examples seen.

There is no learning-rate scheduler; EWC's anchor and Fisher, the replay buffer and a
distiller's teacher are inputs that stay fixed for a run, so the caller makes them part of the
`fingerprint` (with the data, the settings and the starting weights) instead of storing them:
a state written under another fingerprint is discarded, never resumed.

The file is written to a temporary name, fsynced and renamed (and the folder fsynced): a run
killed while saving leaves the previous state whole. A state that cannot be read (truncated,
tampered, another fingerprint, other shapes) is discarded with a warning: resuming is an
optimisation, a broken file must not fail the run. No pickle: tensors in safetensors, the rest
as JSON in its metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor, nn

from continual.files import atomic_write_bytes

if TYPE_CHECKING:
    from continual.batching import BatchStream
    from continual.training import TrainResult

log = logging.getLogger(__name__)
FORMAT = "evergreen-train-state/1"


@dataclass
class Checkpointing:
    """Where and how often `train` saves its state, and what makes a saved state resumable.

    Attributes:
        path: the state file (its folder is created on the first save).
        fingerprint: identifies the run (data, settings, starting weights, method state); a
            state saved under another fingerprint is discarded.
        every_steps: save after every this many steps (0: not by steps).
        every_seconds: save when this many seconds passed since the last save (0: not by time).
        on_resumed: called as on_resumed(step, total) when a run resumes from a saved state.
        on_saved: called as on_saved(step) after each save (fault-injection tests stop here).
    """

    path: Path
    fingerprint: str
    every_steps: int = 0
    every_seconds: float = 0.0
    on_resumed: Callable[[int, int], None] | None = None
    on_saved: Callable[[int], None] | None = None
    _last_save: float = field(default_factory=time.monotonic, repr=False)

    def due(self, step: int, total: int) -> bool:
        """Whether to save after `step`: on the step cadence, the time cadence, or at the end."""
        if step == total:
            return True
        if self.every_steps and step % self.every_steps == 0:
            return True
        return bool(self.every_seconds) and time.monotonic() - self._last_save >= self.every_seconds

    def saved(self, step: int) -> None:
        self._last_save = time.monotonic()
        if self.on_saved is not None:
            self.on_saved(step)


@dataclass
class TrainState:
    """The loop's state after `step` of `total` steps."""

    step: int
    total: int
    model: dict[str, Tensor]
    optimizer: dict[int, dict[str, Tensor]]
    generator: Tensor
    epoch: dict[str, Any]  # {"rng": Tensor | None, "position": int}
    rng: Tensor
    cuda_rng: list[Tensor]
    losses: list[float]
    examples_seen: int
    seconds: float


def trained_tensors(model: nn.Module) -> dict[str, Tensor]:
    """What a run changes: trainable parameters and buffers (shared tensors named once)."""
    named: dict[str, Tensor] = {n: p for n, p in model.named_parameters() if p.requires_grad}
    named.update({f"buffer:{n}": b for n, b in model.named_buffers()})
    return named


def tensor_digest(*groups: Tensor | dict[str, Tensor] | None) -> str:
    """sha256 over tensors' dtypes, shapes and bytes (dicts in key order): part of a fingerprint."""
    digest = hashlib.sha256()
    for group in groups:
        items = group.items() if isinstance(group, dict) else [("", group)]
        for name, tensor in sorted(items, key=lambda kv: kv[0]):
            if tensor is None:
                continue
            plain = tensor.detach().cpu().contiguous()
            digest.update(f"{name}|{plain.dtype}|{tuple(plain.shape)}|".encode())
            digest.update(plain.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_state(checkpointing: Checkpointing, state: TrainState) -> bool:
    """Write `state` atomically; False (with a warning) when it cannot be written (disk full):
    the run goes on, it only loses the chance to resume from this step."""
    tensors = {f"model.{k}": v for k, v in state.model.items()}
    for index, entries in state.optimizer.items():
        tensors.update({f"optim.{index}.{k}": v for k, v in entries.items()})
    tensors["rng.generator"] = state.generator
    tensors["rng.torch"] = state.rng
    tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(state.cuda_rng)})
    if state.epoch["rng"] is not None:
        tensors["rng.epoch"] = state.epoch["rng"]
    tensors["losses"] = torch.tensor(state.losses, dtype=torch.float64)
    meta = {
        "format": FORMAT,
        "fingerprint": checkpointing.fingerprint,
        "step": str(state.step),
        "total": str(state.total),
        "position": str(state.epoch["position"]),
        "examples_seen": str(state.examples_seen),
        "seconds": repr(state.seconds),
        "cuda_devices": str(len(state.cuda_rng)),
    }
    plain = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    try:
        atomic_write_bytes(checkpointing.path, save(plain, metadata=meta), sync_folder=True)
    except OSError as error:
        log.warning("training state not saved at step %d: %s", state.step, error)
        return False
    return True


def load_state(checkpointing: Checkpointing, total: int) -> TrainState | None:
    """The saved state if there is one for this fingerprint and step count, else None (a state
    that does not match or cannot be read is removed, with a warning saying why)."""
    path = checkpointing.path
    if not path.is_file():
        return None
    try:
        return _parse(path.read_bytes(), checkpointing.fingerprint, total)
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        discard(checkpointing, str(error))
        return None


def discard(checkpointing: Checkpointing, why: str) -> None:
    """Remove a saved state that cannot be resumed, saying why (the run starts from step 0)."""
    log.warning("discarding the training state %s: %s", checkpointing.path.name, why)
    checkpointing.path.unlink(missing_ok=True)


def _parse(data: bytes, fingerprint: str, total: int) -> TrainState:
    meta = _metadata(data)
    if meta.get("format") != FORMAT:
        raise ValueError(f"unknown format {meta.get('format')!r}")
    if meta.get("fingerprint") != fingerprint:
        raise ValueError("it belongs to another run (data, settings, weights or method state)")
    if int(meta["total"]) != total or not 0 < int(meta["step"]) <= total:
        raise ValueError(f"step {meta['step']} of {meta['total']} does not fit {total} steps")
    tensors = load(data)
    optimizer: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            index, name = key[len("optim.") :].split(".", 1)
            optimizer.setdefault(int(index), {})[name] = value
    return TrainState(
        step=int(meta["step"]),
        total=total,
        model={k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")},
        optimizer=optimizer,
        generator=tensors["rng.generator"],
        epoch={"rng": tensors.get("rng.epoch"), "position": int(meta["position"])},
        rng=tensors["rng.torch"],
        cuda_rng=[tensors[f"rng.cuda.{i}"] for i in range(int(meta["cuda_devices"]))],
        losses=tensors["losses"].tolist(),
        examples_seen=int(meta["examples_seen"]),
        seconds=float(meta["seconds"]),
    )


def _metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's `__metadata__` (checked before any tensor is read)."""
    if len(data) < 8:
        raise ValueError("truncated file")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError("truncated header")
    try:
        header = json.loads(data[8 : 8 + size])
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"unreadable header ({error})") from error
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise ValueError("no metadata")
    return {str(k): str(v) for k, v in meta.items()}


def check_model(model: nn.Module, saved: dict[str, Tensor]) -> None:
    """Raise ValueError unless `saved` holds exactly the model's trained tensors and shapes."""
    current = trained_tensors(model)
    if set(current) != set(saved):
        missing, extra = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
        raise ValueError(f"tensors differ: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, tensor in current.items():
        if tensor.shape != saved[name].shape:
            raise ValueError(f"{name}: saved {tuple(saved[name].shape)}, model {tensor.shape}")


def restore_model(model: nn.Module, saved: dict[str, Tensor]) -> None:
    """Copy the saved trainable parameters and buffers into `model` (names and shapes checked).

    Raises:
        ValueError: a tensor is missing, extra, or of another shape.
    """
    check_model(model, saved)
    current = trained_tensors(model)
    with torch.no_grad():
        for name, tensor in current.items():
            tensor.copy_(saved[name])


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Tensor]]:
    """The optimiser's per-parameter state as tensors (AdamW: step, exp_avg, exp_avg_sq)."""
    state: dict[int, dict[str, Tensor]] = {}
    for index, entries in optimizer.state_dict()["state"].items():
        state[int(index)] = {
            k: v if isinstance(v, Tensor) else torch.tensor(v) for k, v in entries.items()
        }
    return state


def check_optimizer(optimizer: torch.optim.Optimizer, saved: dict[int, dict[str, Tensor]]) -> None:
    """Raise ValueError unless `saved` fits the optimiser's parameters (checked before anything
    is restored, so a state that does not fit is discarded and the run starts over cleanly)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    unknown = sorted(set(saved) - set(range(len(params))))
    if unknown:
        raise ValueError(f"optimiser state for parameters {unknown[:3]} the run does not have")
    for index, entries in saved.items():
        for name, tensor in entries.items():
            if tensor.ndim and tensor.shape != params[index].shape:
                raise ValueError(
                    f"optimiser {name} of parameter {index}: saved {tuple(tensor.shape)}, "
                    f"parameter {tuple(params[index].shape)}"
                )


def restore_optimizer(
    optimizer: torch.optim.Optimizer, saved: dict[int, dict[str, Tensor]]
) -> None:
    """Load saved per-parameter state; the hyper-parameters stay those of this run's settings."""
    check_optimizer(optimizer, saved)
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": dict(saved), "param_groups": groups})


@dataclass
class LoopState:
    """The mutable parts of a running `train` loop, which a saved state captures and restores."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    batches: BatchStream
    cuda: list[int]
    result: TrainResult

    def save(self, checkpointing: Checkpointing, step: int, total: int, seconds: float) -> None:
        state = TrainState(
            step=step,
            total=total,
            model=trained_tensors(self.model),
            optimizer=optimizer_tensors(self.optimizer),
            generator=self.generator.get_state(),
            epoch=self.batches.state(),
            rng=torch.get_rng_state(),
            cuda_rng=[torch.cuda.get_rng_state(d) for d in self.cuda],
            losses=self.result.losses,
            examples_seen=self.result.examples_seen,
            seconds=self.result.seconds + seconds,
        )
        if save_state(checkpointing, state):
            checkpointing.saved(step)

    def resume(self, checkpointing: Checkpointing, total: int) -> None:
        """Restore a saved state of this run, if there is one (called inside the RNG fork)."""
        state = load_state(checkpointing, total)
        if state is None:
            return
        try:
            check_model(self.model, state.model)
            check_optimizer(self.optimizer, state.optimizer)
            if len(state.cuda_rng) != len(self.cuda):
                raise ValueError("saved on another number of CUDA devices")
        except ValueError as error:
            discard(checkpointing, str(error))
            return
        restore_model(self.model, state.model)
        restore_optimizer(self.optimizer, state.optimizer)
        self.generator.set_state(state.generator)
        self.batches.restore(state.epoch)
        torch.set_rng_state(state.rng)
        for device, rng in zip(self.cuda, state.cuda_rng, strict=True):
            torch.cuda.set_rng_state(rng, device)
        self.result.losses = list(state.losses)
        self.result.examples_seen = state.examples_seen
        self.result.seconds = state.seconds
        self.result.resumed_at = state.step
        if checkpointing.on_resumed is not None:
            checkpointing.on_resumed(state.step, total)
