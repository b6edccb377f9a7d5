"""Online LoRA (via peft) with validation gating: small, reversible daily updates.

LoRA adds W + (α/r)·B·A to chosen Linear layers and trains only A and B, so an update is a few
small tensors that can be snapshotted and restored bit-exactly. `gated_update` keeps an update
only if a judgement of the trained model accepts it (the flows use the promotion gate's own
statistical rule on selection rows), and otherwise restores the snapshot exactly: a bad day's
data never reaches the served weights.

Note: `attach_lora` (like peft's `get_peft_model`) injects the LoRA layers into the model it is
given, and `merge_adapter` folds them back into that same module; deep-copy first if the
original must stay untouched.

Merging adapters (on ΔW = scaling·B·A) is in `continual.lora_merge`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from torch import Tensor, nn

from continual.models import default_lora_targets
from continual.training import TrainResult


@dataclass
class LoraSettings:
    """LoRA hyper-parameters.

    Attributes:
        r: rank of the update B·A (8 on a pretrained transformer's attention projections; the
            tabular MLPs' narrow layers need more — evergreen ships 32 there, measured in
            `evergreen.config_families`; higher adds capacity, and forgetting).
        alpha: scaling numerator; the update is scaled by alpha / r.
        dropout: dropout on the LoRA branch input.
        target_modules: Linear layer names (or name suffixes) to adapt; None picks
            `default_lora_targets(model)` (q_proj/v_proj, query/value, else all but classifier).
        seed: seeds the random initialisation of A (B starts at zero), so an adapter does not
            depend on what else drew from torch's global generator earlier in the process.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be > 0, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules is an empty list; use None for the default targets")


class LoraTargetError(ValueError):
    """`daily.target_modules` names a module the model does not have (a configuration error:
    `evergreen.errors` reports it as such, exit 3)."""


def _matches(module_name: str, target: str) -> bool:
    """peft's rule for a string target: the full name or a dotted suffix of it."""
    return module_name == target or module_name.endswith("." + target)


def attach_lora(model: nn.Module, settings: LoraSettings) -> PeftModel:
    """Wrap `model` with fresh LoRA adapters; only the adapter tensors stay trainable.

    Args:
        model: a plain module (modified in place by peft).
        settings: rank, alpha, dropout and target modules.

    Returns:
        The peft model; B is zero-initialised, so it predicts exactly like `model` at first.

    Raises:
        LoraTargetError: a target matches no Linear layer (the message lists the available
            ones).
        ValueError: the model already is a peft model.
    """
    if isinstance(model, PeftModel):
        raise ValueError(
            "the model already carries a LoRA adapter: merge it first (merge_adapter) or keep "
            "training the existing one"
        )
    targets = settings.target_modules or default_lora_targets(model)
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    absent = [t for t in targets if not any(_matches(name, t) for name in linear)]
    if absent:
        names = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise LoraTargetError(
            f"LoRA target modules {absent} match no Linear layer; available: {names} (a "
            f"module's name, or a dotted suffix of a full name such as {linear[0]!r})"
        )
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(targets),
        bias="none",
    )
    # peft draws A from torch's global generator: seeded here, and the caller's stream restored
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return get_peft_model(model, config)


def adapter_snapshot(peft_model: nn.Module) -> dict[str, Tensor]:
    """Clones of every trainable (adapter) tensor, keyed by parameter name."""
    return {
        name: p.detach().clone() for name, p in peft_model.named_parameters() if p.requires_grad
    }


@torch.no_grad()
def restore_adapter(peft_model: nn.Module, snapshot: dict[str, Tensor]) -> None:
    """Copy a snapshot back into the adapter tensors, in place and bit-exactly.

    Raises:
        KeyError: the snapshot does not hold exactly the model's trainable tensors.
    """
    params = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    if set(params) != set(snapshot):
        missing = sorted(set(params) - set(snapshot))[:5]
        extra = sorted(set(snapshot) - set(params))[:5]
        raise KeyError(f"snapshot does not fit the model: missing {missing}, extra {extra}")
    for name, p in params.items():
        p.copy_(snapshot[name])


@dataclass
class LoraGateResult:
    """Outcome of one gated update: whether it was kept, and the training run."""

    accepted: bool
    train: TrainResult | None


def gated_update(
    peft_model: nn.Module,
    train_fn: Callable[[nn.Module], TrainResult | None],
    keep_fn: Callable[[nn.Module], bool],
) -> LoraGateResult:
    """Train the adapter; keep the update only if `keep_fn` accepts the trained model.

    `keep_fn` is the judgement, e.g. the promotion gate's non-inferiority rule on selection
    rows against the model before the update (with a zero-initialised adapter that is the
    base model itself). A raw score difference on a short validation set is the trap the
    method guide warns about: its noise discards good updates and keeps bad ones.

    Args:
        peft_model: the model with LoRA attached.
        train_fn: trains the model in place (e.g. `lambda m: train(m, X, y, settings)`).
        keep_fn: called with the trained model; True keeps the update.

    Returns:
        LoraGateResult; when rejected the adapter holds exactly its pre-update values.
    """
    snapshot = adapter_snapshot(peft_model)
    result = train_fn(peft_model)
    peft_model.eval()
    accepted = bool(keep_fn(peft_model))
    if not accepted:
        restore_adapter(peft_model, snapshot)
    return LoraGateResult(accepted, result)


def merge_adapter(peft_model: PeftModel) -> nn.Module:
    """Fold the adapter into the base weights and return the plain module.

    The result has exactly the base model's state-dict keys, so it saves and loads as an
    ordinary checkpoint.
    """
    merged: nn.Module = peft_model.merge_and_unload()
    return merged


def adapter_state_dict(peft_model: PeftModel) -> dict[str, Tensor]:
    """The adapter tensors as peft saves them (`get_peft_model_state_dict`)."""
    state: dict[str, Tensor] = get_peft_model_state_dict(peft_model)
    return state


def save_adapter(peft_model: PeftModel, directory: str | Path) -> None:
    """Save the adapter (adapter_config.json + adapter_model.safetensors) to `directory`.

    The folder is written beside the target and swapped in, so a crash never leaves a
    half-written adapter.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        peft_model.save_pretrained(str(staging), safe_serialization=True)
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, old / directory.name)
            os.replace(staging, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_adapter(model: nn.Module, directory: str | Path, *, trainable: bool = False) -> PeftModel:
    """Attach a saved adapter to `model` (modified in place).

    Args:
        model: a plain module with the same architecture the adapter was trained on.
        directory: folder written by `save_adapter`.
        trainable: keep the adapter trainable (to continue online updates) instead of
            inference-only.

    Raises:
        FileNotFoundError: the folder lacks adapter_config.json or adapter_model.safetensors.
        ValueError: adapter_config.json is not valid JSON.
    """
    directory = Path(directory)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name}: missing; not a saved adapter folder")
    try:
        json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{directory / 'adapter_config.json'}: not valid JSON ({exc})") from exc
    peft_model = PeftModel.from_pretrained(model, str(directory), is_trainable=trainable)
    return peft_model.eval()
