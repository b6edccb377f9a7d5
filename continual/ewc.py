"""Online Elastic Weight Consolidation: the penalty, how training applies it, and the state on disk.

Penalty: λ · Σ_i F̂_i (θ_i − θ*_i)² with θ* the anchor (the champion's weights).

State, per model version:
- `own_fisher`: the Fisher of this version's weights on this version's own training data. A
  Fisher-weighted merge needs exactly this; the accumulator below counts the parents again.
- `fisher`: the online accumulator F ← γ·F + F_own (raw, as estimated), which the penalty uses.
- `anchor`: θ*, the weights the accumulator was last consolidated at.

On disk (`save`/`load`; the file format is `continual.ewc_state`) the anchor may be left out
when it is the weights saved beside it (`anchor_in_model`), and, for a version stored against a
parent version, accumulator entries equal to the parent's (or to γ·F_parent + F_own) are taken
from the parent's state (`ParentFisher`, format evergreen.ewc/3); `tasks.state` resolves both.

Normalisation: the penalty uses F̂ = F / mean(F), the mean taken over every entry of every
tensor (`fisher_scale`; saved in the metadata, raw tensors on disk). λ then means "the stiffness
of a parameter of average importance", whatever the dataset, the loss scale, the Fisher kind or
the number of consolidations; F only sets the relative importance. Without it λ silently
changes meaning whenever the Fisher's scale moves: the empirical Fisher grows with (p − y)², so
after a drift it grew 10⁵× in the demo and stiffened the model. `normalize=False` keeps raw F
(Laplace reading: with the true Fisher, λ = 0.5 makes the penalty ≈ the rise of the old data's
mean loss, i.e. old and new examples count alike).

Application (`mode`):
- "proximal" (default): after `optimizer.step()`, the closed-form proximal step of λF̂(θ−θ*)²
  with step size lr, θ ← (θ + 2·lr·λ·F̂·θ*) / (1 + 2·lr·λ·F̂) (`proximal_step_`, one foreach
  lerp, no autograd graph). Adam never sees the penalty, so it cannot normalise the F-weighting
  away (with the penalty inside Adam every dominated parameter moves ≈ lr per step whatever its
  F), and the penalty does not count against gradient clipping. A huge λF̂ pins a parameter to
  θ*; F̂ = 0 leaves the optimiser's step untouched. It is AdamW's decoupled weight decay, toward
  θ* instead of 0, with coefficient 2λF̂.
- "gradient": `add_penalty_grad_` adds 2λF̂(θ−θ*) to `.grad` after `loss.backward()` and before
  clipping, as the textbook penalty does; Adam then rescales it per parameter, and a large
  penalty eats the clipping budget, shrinking the task gradient of every other parameter.
`continual.training.train` applies whichever `mode` says.

The Fisher comes from `continual.fisher` (per-example gradients; the kind, default "auto", is
explained there).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal, cast

import torch
from torch import Tensor, nn

from continual.ewc_state import (
    RESERVED_METADATA,
    EWCStateError,
    ParentFisher,
    ParentFisherSource,
    StoredEWC,
    plus_own,
    read_state,
    write_state,
)
from continual.fisher import diagonal_fisher
from continual.fisher_kinds import FISHER_KINDS, FisherKind, LossFn

EWCMode = Literal["proximal", "gradient"]
EWC_MODES: tuple[str, ...] = ("proximal", "gradient")


def _validate_state(fisher: dict[str, Tensor], anchor: dict[str, Tensor], what: str) -> None:
    missing = [name for name in fisher if name not in anchor]
    if missing:
        raise ValueError(f"EWC anchor lacks {len(missing)} {what} entries, e.g. {missing[:5]}")
    for name, f in fisher.items():
        if f.shape != anchor[name].shape:
            raise ValueError(
                f"EWC {name!r}: {what} shape {tuple(f.shape)} != anchor {tuple(anchor[name].shape)}"
            )
        if not f.is_floating_point() or not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
            raise ValueError(f"EWC {what} {name!r} must be finite, non-negative floats")


def _float32_copy(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached copies, upcast to float32 at least (sums of bf16/fp16 squares lose mass)."""
    return {
        n: t.detach().to(torch.promote_types(t.dtype, torch.float32), copy=True)
        for n, t in tensors.items()
    }


def _mean_entry(fisher: dict[str, Tensor]) -> float:
    """Mean over every entry of every tensor, in float64; 1.0 when there is nothing to scale."""
    count = sum(f.numel() for f in fisher.values())
    total = sum(float(f.double().sum()) for f in fisher.values())
    return total / count if count and total > 0 else 1.0


class EWC:
    """Online EWC: one decayed Fisher and one anchor, so the cost stays constant over time.

    Args:
        fisher: the accumulator F (raw; normalised for the penalty, see the module docstring).
        anchor: θ*; may hold more entries than `fisher` (e.g. every parameter), only those with
            a Fisher entry are kept.
        lam: λ ≥ 0.
        gamma: Fisher decay γ in [0, 1] used by `consolidate`.
        own_fisher: this version's own Fisher (None if unknown); its names ⊆ `fisher`'s.
        mode: "proximal" (default) or "gradient": how training applies the penalty.
        kind: Fisher kind `from_model`/`consolidate` estimate ("auto", "true", "sampled",
            "empirical").
        normalize: divide F by its mean entry for the penalty (default True).

    `penalty(model)` = λ Σ_i F̂_i (θ_i − θ*_i)² (for logging).
    """

    def __init__(
        self,
        fisher: dict[str, Tensor],
        anchor: dict[str, Tensor],
        lam: float,
        gamma: float = 1.0,
        *,
        own_fisher: dict[str, Tensor] | None = None,
        mode: EWCMode = "proximal",
        kind: FisherKind = "auto",
        normalize: bool = True,
    ) -> None:
        if not math.isfinite(lam) or lam < 0:
            raise ValueError(f"EWC lambda must be a finite number >= 0, got {lam}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"EWC gamma (Fisher decay) must be in [0, 1], got {gamma}")
        _validate_state(fisher, anchor, "fisher")
        if own_fisher is not None:
            stray = [n for n in own_fisher if n not in fisher]
            if stray:
                raise ValueError(f"EWC own_fisher has entries without a Fisher, e.g. {stray[:5]}")
            _validate_state(own_fisher, anchor, "own_fisher")
        self.lam = float(lam)
        self.gamma = float(gamma)
        self.mode = mode
        self.kind = kind
        self._normalize = bool(normalize)
        self.metadata: dict[str, str] = {}
        self._anchor = {n: anchor[n].detach().clone() for n in fisher}
        self._set_fisher(_float32_copy(fisher), own_fisher)

    @property
    def mode(self) -> EWCMode:
        """How training applies the penalty: "proximal" or "gradient" (validated on assignment:
        a typo must not silently switch EWC off)."""
        return self._mode

    @mode.setter
    def mode(self, mode: EWCMode) -> None:
        if mode not in EWC_MODES:
            raise ValueError(f"EWC mode must be one of {EWC_MODES}, got {mode!r}")
        self._mode: EWCMode = mode

    @property
    def kind(self) -> FisherKind:
        """The Fisher kind `consolidate` estimates (see `continual.fisher`)."""
        return self._kind

    @kind.setter
    def kind(self, kind: FisherKind) -> None:
        if kind not in FISHER_KINDS:
            raise ValueError(f"EWC Fisher kind must be one of {FISHER_KINDS}, got {kind!r}")
        self._kind: FisherKind = kind

    @property
    def normalize(self) -> bool:
        """Whether the penalty divides the Fisher by its mean entry (fixed at construction)."""
        return self._normalize

    def _set_fisher(self, fisher: dict[str, Tensor], own: dict[str, Tensor] | None) -> None:
        self._fisher = fisher
        self._own = None if own is None else _float32_copy(own)
        self._scale = _mean_entry(fisher) if self._normalize else 1.0
        # cached (key, params, anchors, coefficients), one per mode (gradient: lr None)
        self._plans: dict[bool, tuple[object, list[Tensor], list[Tensor], list[Tensor]]] = {}

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
        mode: EWCMode = "proximal",
        kind: FisherKind = "auto",
        normalize: bool = True,
    ) -> EWC:
        """Fisher of `model` on (X, y), anchored at the model's current parameters.

        (X, y) should be the model's own training data: the Fisher is also its `own_fisher`.
        """
        fisher = diagonal_fisher(model, X, y, kind=kind, batch_size=batch_size, loss_fn=loss_fn)
        params = dict(model.named_parameters())
        anchor = {n: params[n].detach() for n in fisher}
        return cls(
            fisher, anchor, lam, gamma, own_fisher=fisher, mode=mode, kind=kind, normalize=normalize
        )

    @property
    def fisher(self) -> dict[str, Tensor]:
        """The raw accumulator γ·F_old + F_own (the penalty divides it by `fisher_scale`)."""
        return dict(self._fisher)

    @property
    def own_fisher(self) -> dict[str, Tensor] | None:
        """This version's own Fisher (at `anchor`, on its own data), or None if unknown."""
        return None if self._own is None else dict(self._own)

    @property
    def anchor(self) -> dict[str, Tensor]:
        return dict(self._anchor)

    @property
    def fisher_scale(self) -> float:
        """The penalty uses fisher / fisher_scale: the mean entry, or 1.0 without normalize."""
        return self._scale

    def to(self, device: torch.device | str) -> EWC:
        """Move Fisher, own Fisher and anchor to `device` (returns self)."""
        self._fisher = {n: t.to(device) for n, t in self._fisher.items()}
        self._anchor = {n: t.to(device) for n, t in self._anchor.items()}
        self._own = None if self._own is None else {n: t.to(device) for n, t in self._own.items()}
        self._plans = {}
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
        """λ Σ F̂ (θ−θ*)² over every Fisher entry, as a detached float32 scalar (for logging)."""
        params = self._model_params(model)
        total = torch.zeros((), dtype=torch.float64, device=next(iter(params.values())).device)
        for name, f in self._fisher.items():
            p = params[name]
            diff = p.double() - self._anchor[name].to(p.device, torch.float64)
            total += (f.to(p.device, torch.float64) * diff.square()).sum()
        return (self.lam / self._scale * total).to(torch.float32)

    def _coefficients(self, model: nn.Module, lr: float | None) -> tuple[list[Tensor], ...]:
        """Cached (params, anchors, coefficients) for trainable params with a Fisher entry.

        Coefficients: 2λF̂ (gradient mode, lr None) or the lerp weight c/(1+c) toward θ* with
        c = 2·lr·λ·F̂ (proximal step); computed in float32 at least, stored in the parameter's
        dtype.
        """
        named = list(model.named_parameters())
        key = (id(model), self.lam, lr, tuple((id(p), p.requires_grad) for _, p in named))
        plan = self._plans.get(lr is None)
        if plan is None or plan[0] != key:
            params = self._model_params(model)
            names = [n for n in self._fisher if params[n].requires_grad]
            ps: list[Tensor] = [params[n] for n in names]
            anchors, coefficients = [], []
            for name, p in zip(names, ps, strict=True):
                anchors.append(self._anchor[name].to(p.device, p.dtype))
                c = (2.0 * self.lam / self._scale) * self._fisher[name].to(p.device)
                if lr is not None:  # c/(1+c) written so that c = 0 gives 0 and c = inf gives 1
                    c = torch.reciprocal(1.0 + torch.reciprocal(lr * c))
                coefficients.append(c.to(p.dtype))
            plan = self._plans[lr is None] = (key, ps, anchors, coefficients)
        return plan[1], plan[2], plan[3]

    @torch.no_grad()
    def add_penalty_grad_(self, model: nn.Module) -> None:
        """Gradient mode: add 2λF̂(θ−θ*) to `p.grad` (created if None) of trainable params with
        a Fisher entry. Call after `loss.backward()`, before clipping and `optimizer.step()`."""
        params, anchors, scaled = self._coefficients(model, None)
        if not params:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        diffs = torch._foreach_sub(params, anchors)
        grads = [p.grad for p in params if p.grad is not None]
        torch._foreach_addcmul_(grads, diffs, scaled)

    @torch.no_grad()
    def proximal_step_(self, model: nn.Module, lr: float) -> None:
        """Proximal mode: θ ← (θ + 2·lr·λ·F̂·θ*) / (1 + 2·lr·λ·F̂) for trainable params with a
        Fisher entry, i.e. θ ← θ + w·(θ* − θ) with w = c/(1+c), c = 2·lr·λ·F̂. Call right after
        `optimizer.step()` with that step's learning rate."""
        if not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"proximal_step_ needs a learning rate > 0, got {lr}")
        params, anchors, weights = self._coefficients(model, float(lr))
        if params:
            torch._foreach_lerp_(params, anchors, weights)

    def consolidate(
        self,
        model: nn.Module,
        X: Tensor,
        y: Tensor,
        *,
        batch_size: int = 256,
        loss_fn: LossFn | None = None,
        own: dict[str, Tensor] | None = None,
        untouched: Literal["decay", "keep"] = "decay",
    ) -> None:
        """After training a new version on (X, y): its own Fisher F_own (at the new weights, on
        (X, y), of kind `self.kind`) becomes `own_fisher`; F ← γ·F + F_own; θ* ← the weights.

        Parameters without a new Fisher (frozen now) keep γ·F_old (`untouched="decay"`), or
        F_old as it is (`"keep"`: the update did not change them and is not consolidated
        there — a LoRA version, whose accumulator then equals its parent's on every weight
        outside the adapter's targets and the head); new trainable ones get F_own.
        `own`: F_own already estimated on (X, y) at these weights (e.g. all-reduced across the
        ranks that trained the model, `continual.distributed`, or only on the parameters an
        update changed); None estimates it here.
        """
        if untouched not in ("decay", "keep"):
            raise ValueError(f"untouched must be 'decay' or 'keep', got {untouched!r}")
        params = self._model_params(model)
        if own is None:
            own = diagonal_fisher(
                model, X, y, kind=self.kind, batch_size=batch_size, loss_fn=loss_fn
            )
        fisher: dict[str, Tensor] = {}
        for name in [*self._fisher, *(n for n in own if n not in self._fisher)]:
            old, fresh = self._fisher.get(name), own.get(name)
            if old is None:
                assert fresh is not None
                fisher[name] = fresh.clone()
            elif fresh is None:
                fisher[name] = old.clone() if untouched == "keep" else self.gamma * old
            else:
                fisher[name] = plus_own(fresh, old, self.gamma)
        self._anchor = {n: params[n].detach().clone() for n in fisher}
        self._set_fisher(fisher, own)

    def anchored_at(self, parameters: dict[str, Tensor]) -> bool:
        """True when the anchor θ* is exactly `parameters` (the usual case: a version's EWC is
        anchored at its own weights), so `save(anchor_in_model=True)` need not store it twice."""
        return all(
            n in parameters
            and parameters[n].shape == a.shape
            and torch.equal(parameters[n].detach().to(a.device, a.dtype), a)
            for n, a in self._anchor.items()
        )

    def save(
        self,
        path: str | Path,
        metadata: dict[str, str] | None = None,
        *,
        anchor_in_model: bool = False,
        parent: ParentFisher | None = None,
    ) -> None:
        """Write the state to safetensors, atomically (`continual.ewc_state.write_state`: the
        layout, `anchor_in_model` and what `parent` saves)."""
        settings = {
            "lambda": repr(self.lam),
            "gamma": repr(self.gamma),
            "mode": self.mode,
            "fisher_kind": self.kind,
            "normalize": json.dumps(self._normalize),
            "fisher_scale": repr(self._scale),  # informational: recomputed from the tensors
        }
        write_state(
            Path(path),
            StoredEWC(self._fisher, self._anchor, self._own, self.gamma),
            settings,
            dict(metadata or {}),
            anchor_in_model=anchor_in_model,
            parent=parent,
        )

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        lam: float | None = None,
        gamma: float | None = None,
        mode: EWCMode | None = None,
        model_parameters: dict[str, Tensor] | None = None,
        parent: ParentFisherSource | None = None,
    ) -> EWC:
        """Read a state written by `save`; `lam`/`gamma`/`mode` override the stored values.
        `model_parameters` supplies the anchor of a state saved with `anchor_in_model`;
        `parent` the accumulator of the version a state saved with `parent=` references (called
        only when the file takes entries from it).

        A file without own-Fisher tensors (e.g. format evergreen.ewc/1) loads with
        `own_fisher` None; missing mode/kind/normalize metadata take the constructor defaults.

        Raises:
            FileNotFoundError: no file at `path`.
            EWCStateError: the file is truncated, corrupt, or not an EWC state; or it takes
                entries from a parent that is not given or is not the recorded one.
        """
        path = Path(path)
        meta, stored = read_state(path, model_parameters=model_parameters, parent=parent)
        try:
            ewc = cls(
                stored.fisher,
                stored.anchor,
                float(meta["lambda"]) if lam is None else lam,
                float(meta.get("gamma", 1.0)) if gamma is None else gamma,
                own_fisher=stored.own,
                # stored strings; the EWC setters reject anything but a known mode and kind
                mode=mode or cast(EWCMode, meta.get("mode", "proximal")),
                kind=cast(FisherKind, meta.get("fisher_kind", "auto")),
                normalize=json.loads(meta.get("normalize", "true")),
            )
        except (ValueError, KeyError) as exc:
            raise EWCStateError(f"{path}: inconsistent EWC state: {exc}") from exc
        ewc.metadata = {k: v for k, v in meta.items() if k not in RESERVED_METADATA}
        return ewc
