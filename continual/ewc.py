"""Online Elastic Weight Consolidation: the penalty, its gradient, and the state on disk.

The diagonal Fisher it needs comes from `continual.fisher` (per-example gradients; see there);
`diagonal_fisher`, `brute_force_fisher` and `fisher_paths` are re-exported here so callers can
keep importing them from `continual.ewc`. The EWC penalty gradient 2λF(θ−θ*) is added with
`torch._foreach_*` ops after `loss.backward()`: no autograd graph of the penalty is ever built.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from continual.fisher import LossFn, brute_force_fisher, diagonal_fisher, fisher_paths

__all__ = [
    "EWC",
    "FORMAT",
    "EWCStateError",
    "LossFn",
    "brute_force_fisher",
    "diagonal_fisher",
    "fisher_paths",
]

FORMAT = "evergreen.ewc/1"
_RESERVED_METADATA = ("format", "lambda", "gamma", "names")


class EWCStateError(ValueError):
    """A saved EWC state is missing, truncated, corrupt or inconsistent."""


def _validate_state(fisher: dict[str, Tensor], anchor: dict[str, Tensor]) -> None:
    missing = [name for name in fisher if name not in anchor]
    if missing:
        raise ValueError(f"EWC anchor lacks {len(missing)} Fisher entries, e.g. {missing[:5]}")
    for name, f in fisher.items():
        if f.shape != anchor[name].shape:
            raise ValueError(
                f"EWC {name!r}: fisher shape {tuple(f.shape)} != anchor {tuple(anchor[name].shape)}"
            )
        if not f.is_floating_point() or not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
            raise ValueError(f"EWC fisher {name!r} must be finite, non-negative floats")


class EWC:
    """Online EWC: one decayed Fisher and one anchor, so the cost stays constant over time.

    The anchor may hold more entries than the Fisher (e.g. every parameter); only those with a
    Fisher entry are kept.

    `penalty(model)` = λ Σ_i F_i (θ_i − θ*_i)² (for logging); training adds its gradient
    2λF(θ−θ*) with `add_penalty_grad_(model)` right after `loss.backward()`.
    """

    def __init__(
        self, fisher: dict[str, Tensor], anchor: dict[str, Tensor], lam: float, gamma: float = 1.0
    ) -> None:
        if not math.isfinite(lam) or lam < 0:
            raise ValueError(f"EWC lambda must be a finite number >= 0, got {lam}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"EWC gamma (Fisher decay) must be in [0, 1], got {gamma}")
        _validate_state(fisher, anchor)
        self._fisher = {n: t.detach().clone() for n, t in fisher.items()}
        self._anchor = {n: anchor[n].detach().clone() for n in fisher}
        self.lam = float(lam)
        self.gamma = float(gamma)
        self.metadata: dict[str, str] = {}
        self._plan: tuple[object, list[Tensor], list[Tensor], list[Tensor]] | None = None

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        X: Tensor,
        y: Tensor,
        *,
        lam: float,
        gamma: float = 1.0,
        batch_size: int = 256,
        loss_fn: LossFn | None = None,
    ) -> EWC:
        """Fisher of `model` on (X, y), anchored at the model's current parameters."""
        fisher = diagonal_fisher(model, X, y, batch_size=batch_size, loss_fn=loss_fn)
        params = dict(model.named_parameters())
        return cls(fisher, {n: params[n].detach() for n in fisher}, lam, gamma)

    @property
    def fisher(self) -> dict[str, Tensor]:
        return dict(self._fisher)

    @property
    def anchor(self) -> dict[str, Tensor]:
        return dict(self._anchor)

    def to(self, device: torch.device | str) -> EWC:
        """Move Fisher and anchor to `device` (returns self)."""
        self._fisher = {n: t.to(device) for n, t in self._fisher.items()}
        self._anchor = {n: t.to(device) for n, t in self._anchor.items()}
        self._plan = None
        return self

    def _model_params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        missing = [n for n in self._fisher if n not in params]
        if missing:
            raise KeyError(
                f"EWC has Fisher entries for {len(missing)} parameters the model lacks, e.g. "
                f"{missing[:3]}; was the model renamed or wrapped (e.g. by peft) after the Fisher?"
            )
        for name, f in self._fisher.items():
            if params[name].shape != f.shape:
                raise ValueError(
                    f"EWC {name!r}: model shape {tuple(params[name].shape)} != {tuple(f.shape)}"
                )
        return params

    @torch.no_grad()
    def penalty(self, model: nn.Module) -> Tensor:
        """λ Σ F (θ−θ*)² over every Fisher entry, as a detached scalar (for logging)."""
        params = self._model_params(model)
        total = torch.zeros((), dtype=torch.float64, device=next(iter(params.values())).device)
        for name, f in self._fisher.items():
            p = params[name]
            diff = p - self._anchor[name].to(p.device, p.dtype)
            total += (f.to(p.device) * diff.square()).sum().to(total.dtype)
        return (self.lam * total).to(torch.float32)

    def _grad_plan(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Cached (params, anchors, 2λF) for trainable params with a Fisher entry."""
        named = list(model.named_parameters())
        key = (id(model), self.lam, tuple((id(p), p.requires_grad) for _, p in named))
        plan = self._plan
        if plan is None or plan[0] != key:
            params = self._model_params(model)
            names = [n for n in self._fisher if params[n].requires_grad]
            ps: list[Tensor] = [params[n] for n in names]
            anchors = [
                self._anchor[n].to(p.device, p.dtype) for n, p in zip(names, ps, strict=True)
            ]
            scaled = [
                (2.0 * self.lam) * self._fisher[n].to(p.device, p.dtype)
                for n, p in zip(names, ps, strict=True)
            ]
            plan = self._plan = (key, ps, anchors, scaled)
        return plan[1], plan[2], plan[3]

    @torch.no_grad()
    def add_penalty_grad_(self, model: nn.Module) -> None:
        """Add 2λF(θ−θ*) to `p.grad` (created if None) of trainable params with a Fisher entry."""
        params, anchors, scaled = self._grad_plan(model)
        if not params:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        diffs = torch._foreach_sub(params, anchors)
        grads = [p.grad for p in params if p.grad is not None]
        torch._foreach_addcmul_(grads, diffs, scaled)

    def consolidate(
        self,
        model: nn.Module,
        X: Tensor,
        y: Tensor,
        *,
        batch_size: int = 256,
        loss_fn: LossFn | None = None,
    ) -> None:
        """Online EWC step: F ← γ·F_old + F_new on (X, y); θ* ← the model's current parameters.

        Parameters without a new Fisher (frozen now) keep γ·F_old; new trainable ones get F_new.
        """
        params = self._model_params(model)
        new = diagonal_fisher(model, X, y, batch_size=batch_size, loss_fn=loss_fn)
        fisher: dict[str, Tensor] = {}
        for name in [*self._fisher, *(n for n in new if n not in self._fisher)]:
            old, fresh = self._fisher.get(name), new.get(name)
            if old is None:
                assert fresh is not None
                fisher[name] = fresh
            elif fresh is None:
                fisher[name] = self.gamma * old
            else:
                fisher[name] = self.gamma * old.to(fresh.device, fresh.dtype) + fresh
        self._fisher = fisher
        self._anchor = {n: params[n].detach().clone() for n in fisher}
        self._plan = None

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """Write `fisher.<name>`/`anchor.<name>` tensors + metadata to safetensors, atomically."""
        extra = dict(metadata or {})
        clash = [k for k in extra if k in _RESERVED_METADATA]
        if clash or not all(isinstance(v, str) for v in extra.values()):
            raise ValueError(f"EWC metadata must map str->str without keys {_RESERVED_METADATA}")
        meta = {**extra, "format": FORMAT, "lambda": repr(self.lam), "gamma": repr(self.gamma)}
        meta["names"] = json.dumps(list(self._fisher))  # safetensors sorts keys; keep model order
        tensors = {f"fisher.{n}": t.detach().cpu().contiguous() for n, t in self._fisher.items()}
        tensors |= {f"anchor.{n}": t.detach().cpu().contiguous() for n, t in self._anchor.items()}
        path = Path(path)
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

    @classmethod
    def load(cls, path: str | Path, *, lam: float | None = None, gamma: float | None = None) -> EWC:
        """Read a state written by `save`; `lam`/`gamma` override the stored values.

        Raises:
            FileNotFoundError: no file at `path`.
            EWCStateError: the file is truncated, corrupt, or not an EWC state.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"EWC state {path} not found")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        except Exception as exc:
            raise EWCStateError(f"{path} is not a readable safetensors file: {exc}") from exc
        if meta.get("format") != FORMAT:
            raise EWCStateError(f"{path}: metadata format is {meta.get('format')!r}, not {FORMAT}")
        try:
            names = json.loads(meta["names"])
            fisher = {n: tensors.pop(f"fisher.{n}") for n in names}
            anchor = {n: tensors.pop(f"anchor.{n}") for n in names}
        except (KeyError, ValueError, TypeError) as exc:
            raise EWCStateError(f"{path}: tensors do not match the stored names: {exc}") from exc
        if tensors:
            raise EWCStateError(f"{path}: unexpected tensors {sorted(tensors)[:5]}")
        try:
            ewc = cls(
                fisher,
                anchor,
                float(meta["lambda"]) if lam is None else lam,
                float(meta.get("gamma", 1.0)) if gamma is None else gamma,
            )
        except (ValueError, KeyError) as exc:
            raise EWCStateError(f"{path}: inconsistent EWC state: {exc}") from exc
        ewc.metadata = {k: v for k, v in meta.items() if k not in _RESERVED_METADATA}
        return ewc
