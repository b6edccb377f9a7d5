"""What a GPU user expects of the training forward, each opt-in or automatic
(`TrainSettings.precision`, `.compile`, `.gradient_checkpointing`; docs/SCALING.md): the
autocast dtype per device, a `torch.compile`d forward that falls back to the plain model, and
activation checkpointing of the Hugging Face model inside a wrapper. `continual.training.train`
uses all three; each works on CPU (where "auto" means plain fp32).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)
Precision = Literal["auto", "bf16", "fp32"]
PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp32")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the training forward on `device`, or None for plain fp32.

    "auto": bf16 on a CUDA device that supports it, else fp32 (CPU autocast is slower than fp32
    on most CPUs). "bf16": CPU autocast on CPU (an explicit request, useful on CPUs with bf16
    units); on a GPU without bf16 it is refused rather than silently run in fp32.

    Raises:
        ValueError: an unknown precision, or "bf16" on a CUDA device without bf16 support.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if precision == "bf16":
            raise ValueError(
                f"precision 'bf16' was asked for, but {device} has no bf16 support; set "
                "train.precision to 'auto' or 'fp32'"
            )
        return None
    return torch.bfloat16 if precision == "bf16" else None


class TrainingForward:
    """The training forward: `model` itself, or `torch.compile(model)` when asked for.

    Compilation happens lazily on the first call (and again on new input shapes); if it fails
    (no C compiler, an unsupported op) the plain model takes over for the rest of the run, with
    a warning, instead of failing the run. The compiled module shares the model's parameters.
    """

    def __init__(self, model: nn.Module, *, compile: bool) -> None:
        self.model = model
        self.compiled: Callable[[Tensor], Tensor] | None = None
        if compile:
            self.compiled = torch.compile(model)

    def __call__(self, inputs: Tensor) -> Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(inputs)
            except Exception as error:  # any backend failure: fall back to the plain model
                log.warning(
                    "torch.compile failed (%s: %s); training with the uncompiled model",
                    type(error).__name__,
                    str(error).splitlines()[0] if str(error) else "",
                )
                self.compiled = None
        output: Tensor = self.model(inputs)
        return output


@contextmanager
def activation_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Gradient checkpointing of the Hugging Face model inside `model` for the block.

    Non-reentrant checkpointing: a LoRA adapter on a frozen base gets its gradients without
    `enable_input_require_grads` (which the reentrant variant needs), and dropout is replayed
    with the same RNG state in the recomputation. Switched off again afterwards (unless it was
    on before). A model without such a module trains normally, with a warning.
    """
    hf = _checkpointable(model) if enabled else None
    if enabled and hf is None:
        log.warning(
            "gradient_checkpointing: %s holds no Hugging Face model that supports it; "
            "training without it",
            type(model).__name__,
        )
    was_on = hf is not None and _hf_checkpointing(hf, "is")
    if hf is not None and not was_on:
        _hf_checkpointing(hf, "enable")
    try:
        yield
    finally:
        if hf is not None and not was_on:
            _hf_checkpointing(hf, "disable")


def _hf_checkpointing(hf: nn.Module, action: Literal["is", "enable", "disable"]) -> bool:
    """transformers ≥ 5 names it activation checkpointing (the gradient_* names warn)."""
    new = hasattr(hf, "activation_checkpointing_enable")
    prefix = "activation_checkpointing" if new else "gradient_checkpointing"
    if action == "is":
        return bool(getattr(hf, f"is_{prefix}", False))
    method = getattr(hf, f"{prefix}_{action}")
    if action == "enable":
        method(**{f"{prefix}_kwargs": {"use_reentrant": False}})
    else:
        method()
    return True


def _checkpointable(model: nn.Module) -> nn.Module | None:
    """The outermost Hugging Face `PreTrainedModel` in `model` that supports checkpointing."""
    for module in model.modules():
        if getattr(type(module), "supports_gradient_checkpointing", False) and hasattr(
            module, "gradient_checkpointing_enable"
        ):
            return module
    return None
