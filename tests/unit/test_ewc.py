"""EWC (continual/ewc.py): the normalised penalty and its two applications (gradient, proximal
step), online consolidation with the version's own Fisher, and the safetensors round trip. The
Fisher estimate itself is tested in test_fisher.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from continual.ewc import EWC
from continual.ewc_state import EWCStateError
from continual.fisher import diagonal_fisher
from continual.merging import fisher_merge


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )


def _data(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 4, (n,), generator=gen)


def _trained_ewc(lam: float = 3.0, gamma: float = 1.0) -> tuple[nn.Module, EWC]:
    torch.manual_seed(0)
    model = _mlp()
    return model, EWC.from_model(model, *_data(64), lam=lam, gamma=gamma)


def _shift(model: nn.Module, anchor: dict[str, Tensor], delta: dict[str, Tensor], k: float) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(anchor[name] + k * delta[name])


def test_penalty_zero_at_anchor_and_quadratic() -> None:
    model, ewc = _trained_ewc()
    assert float(ewc.penalty(model)) == 0.0
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = {n: torch.randn_like(p) * 0.1 for n, p in anchor.items()}
    _shift(model, anchor, delta, 1.0)
    one = ewc.penalty(model)
    _shift(model, anchor, delta, 2.0)
    two = ewc.penalty(model)
    assert float(one) > 0 and not two.requires_grad
    torch.testing.assert_close(two, 4 * one, rtol=1e-5, atol=0.0)


def test_penalty_uses_the_fisher_normalised_by_its_mean_entry() -> None:
    model, ewc = _trained_ewc(lam=7.0)
    fisher, anchor = ewc.fisher, ewc.anchor
    mean = sum(float(f.double().sum()) for f in fisher.values()) / sum(
        f.numel() for f in fisher.values()
    )
    assert ewc.fisher_scale == pytest.approx(mean, rel=1e-12)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    params = dict(model.named_parameters())
    with torch.no_grad():
        distance = sum(float((fisher[n] * (params[n] - anchor[n]).square()).sum()) for n in fisher)
    expected = 7.0 / mean * distance
    assert float(ewc.penalty(model)) == pytest.approx(expected, rel=1e-5)
    # λ keeps its meaning when the Fisher's scale changes (another dataset, kind, drift)...
    scaled = {n: 1e4 * f for n, f in fisher.items()}
    assert float(EWC(scaled, anchor, 7.0).penalty(model)) == pytest.approx(expected, rel=1e-5)
    # ...unless normalisation is switched off: then the raw Fisher is used
    raw = EWC(fisher, anchor, 7.0, normalize=False)
    assert raw.fisher_scale == 1.0
    assert float(raw.penalty(model)) == pytest.approx(expected * mean, rel=1e-5)


def test_penalty_gradient_equals_autograd() -> None:
    model, ewc = _trained_ewc(lam=7.0)
    anchor = ewc.anchor
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    F_, lam = ewc.fisher, ewc.lam / ewc.fisher_scale
    graph = sum(lam * (F_[n] * (p - anchor[n]).square()).sum() for n, p in model.named_parameters())
    expected = torch.autograd.grad(graph, list(model.parameters()))
    existing = [torch.randn_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), existing, strict=True):
        p.grad = g.clone()
    ewc.add_penalty_grad_(model)
    for p, g, e in zip(model.parameters(), existing, expected, strict=True):
        torch.testing.assert_close(p.grad, g + e, rtol=1e-6, atol=1e-6)


def test_proximal_step_is_the_closed_form_minimiser() -> None:
    """θ_new = argmin λF̂(θ−θ*)² + ‖θ − θ_adam‖²/(2·lr): (θ + 2·lr·λ·F̂·θ*)/(1 + 2·lr·λ·F̂)."""
    model, ewc = _trained_ewc(lam=50.0)
    anchor, lr = ewc.anchor, 0.01
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ewc.proximal_step_(model, lr)
    for name, p in model.named_parameters():
        theta, c = p.detach(), 2 * lr * ewc.lam * ewc.fisher[name] / ewc.fisher_scale
        torch.testing.assert_close(theta, (before[name] + c * anchor[name]) / (1 + c))
        # the objective's gradient vanishes there
        stationary = c * (theta - anchor[name]) + (theta - before[name])
        assert float(stationary.abs().max()) < 1e-6
        assert p.grad is None  # no gradient touched


def test_proximal_step_pins_high_fisher_and_frees_zero_fisher() -> None:
    torch.manual_seed(0)
    anchor = {"w": torch.zeros(4)}
    fisher = {"w": torch.tensor([1.0, 1e-3, 0.0, 0.0])}
    model = nn.Module()
    model.w = nn.Parameter(torch.ones(4))
    ewc = EWC(fisher, anchor, lam=1e9)
    ewc.proximal_step_(model, lr=1e-3)
    w = model.w.detach()
    assert float(w[0]) < 1e-6 and float(w[1]) < 1e-3 and w[2:].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="learning rate"):
        ewc.proximal_step_(model, lr=0.0)


def test_penalty_gradient_only_touches_trainable_params_with_fisher() -> None:
    model, ewc = _trained_ewc()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    model[0].requires_grad_(False)
    frozen_grad = torch.full_like(model[0].weight, 5.0)
    model[0].weight.grad = frozen_grad.clone()
    frozen = model[0].weight.detach().clone()
    ewc.add_penalty_grad_(model)
    assert torch.equal(model[0].weight.grad, frozen_grad) and model[0].bias.grad is None
    assert model[2].weight.grad is not None and float(model[2].weight.grad.abs().sum()) > 0
    ewc.proximal_step_(model, lr=0.1)
    assert torch.equal(model[0].weight.detach(), frozen)
    # Unfreezing changes the trainable set: the cached plan must be rebuilt.
    model[0].requires_grad_(True)
    ewc.add_penalty_grad_(model)
    assert model[0].bias.grad is not None and float(model[0].bias.grad.abs().sum()) > 0
    ewc.proximal_step_(model, lr=0.1)
    assert not torch.equal(model[0].weight.detach(), frozen)


def test_penalty_names_missing_parameters() -> None:
    _, ewc = _trained_ewc()
    with pytest.raises(KeyError, match="renamed or wrapped"):
        ewc.penalty(nn.Sequential(nn.Linear(6, 4)))


def test_from_model_and_consolidate_keep_the_versions_own_fisher() -> None:
    model, ewc = _trained_ewc(gamma=0.5)
    first = ewc.fisher
    assert ewc.own_fisher is not None and ewc.kind == "auto"
    assert all(torch.equal(ewc.own_fisher[n], first[n]) for n in first)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2)
    X2, y2 = _data(48, seed=5)
    own = diagonal_fisher(model, X2, y2)  # the new weights on the new data
    ewc.consolidate(model, X2, y2)
    for name, p in model.named_parameters():
        assert torch.equal(ewc.own_fisher[name], own[name])
        torch.testing.assert_close(ewc.fisher[name], 0.5 * first[name] + own[name])
        assert torch.equal(ewc.anchor[name], p.detach())
    assert float(ewc.penalty(model)) == 0.0
    with torch.no_grad():
        model[0].weight.add_(1.0)  # the anchor is a copy, not a view of the live weights
    assert not torch.equal(ewc.anchor["0.weight"], model[0].weight.detach())


def test_merging_with_the_accumulator_counts_the_parent_twice() -> None:
    """Why own_fisher exists. A child barely different from its parent, on the same data, has
    the same own Fisher, so their Fisher merge is the midpoint; weighted by the online
    accumulators (γ = 1: F_parent + F_child for the child) it lands 2/3 of the way to the child."""
    parent, ewc = _trained_ewc(gamma=1.0)
    parent_state = {k: v.clone() for k, v in parent.state_dict().items()}
    parent_fisher = ewc.own_fisher
    assert parent_fisher is not None
    with torch.no_grad():
        for p in parent.parameters():
            p.add_(1e-4 * torch.randn_like(p))
    ewc.consolidate(parent, *_data(64))  # the same data _trained_ewc used
    assert ewc.own_fisher is not None
    states = [parent_state, parent.state_dict()]

    def share_of_the_way_to_the_child(fishers: list[dict[str, Tensor]]) -> float:
        merged = fisher_merge(states, fishers)
        moved = sum(float((merged[n] - states[0][n]).abs().sum()) for n in merged)
        return moved / sum(float((states[1][n] - states[0][n]).abs().sum()) for n in merged)

    assert share_of_the_way_to_the_child([parent_fisher, ewc.own_fisher]) == pytest.approx(
        0.5, abs=0.01
    )
    assert share_of_the_way_to_the_child([parent_fisher, ewc.fisher]) == pytest.approx(
        2 / 3, abs=0.01
    )


def test_save_load_round_trip_is_bit_exact(tmp_path: Path) -> None:
    model, ewc = _trained_ewc(lam=1234.5678, gamma=0.9)
    ewc.consolidate(model, *_data(32, seed=3))  # accumulator and own Fisher now differ
    ewc.mode, ewc.kind = "gradient", "sampled"
    path = tmp_path / "nested" / "ewc.safetensors"
    ewc.save(path, metadata={"batch_id": "2026-11-21"})
    assert [p.name for p in path.parent.iterdir()] == ["ewc.safetensors"]  # no temp file left
    loaded = EWC.load(path)
    assert (loaded.lam, loaded.gamma, loaded.mode, loaded.kind) == (
        1234.5678,
        0.9,
        "gradient",
        "sampled",
    )
    assert loaded.metadata == {"batch_id": "2026-11-21"}
    assert loaded.fisher_scale == ewc.fisher_scale and loaded.normalize
    assert ewc.own_fisher is not None and loaded.own_fisher is not None
    for mine, theirs in (
        (ewc.fisher, loaded.fisher),
        (ewc.anchor, loaded.anchor),
        (ewc.own_fisher, loaded.own_fisher),
    ):
        assert list(mine) == list(theirs)
        assert all(
            torch.equal(mine[n], theirs[n]) and mine[n].dtype == theirs[n].dtype for n in mine
        )
    overridden = EWC.load(path, lam=1.0, gamma=0.5, mode="proximal")
    assert (overridden.lam, overridden.gamma, overridden.mode) == (1.0, 0.5, "proximal")
    raw = EWC(ewc.fisher, ewc.anchor, 1.0, normalize=False)
    raw.save(tmp_path / "raw.safetensors")
    assert not EWC.load(tmp_path / "raw.safetensors").normalize


def test_a_state_without_own_fisher_still_loads(tmp_path: Path) -> None:
    """Files written before own_fisher existed (format evergreen.ewc/1) load with it None."""
    _, ewc = _trained_ewc(lam=3.0, gamma=0.9)
    names = list(ewc.fisher)
    tensors = {f"fisher.{n}": t for n, t in ewc.fisher.items()}
    tensors |= {f"anchor.{n}": t for n, t in ewc.anchor.items()}
    meta = {
        "format": "evergreen.ewc/1",
        "lambda": "3.0",
        "gamma": "0.9",
        "names": json.dumps(names),
    }
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    old = EWC.load(tmp_path / "old.safetensors")
    assert old.own_fisher is None and (old.lam, old.gamma, old.mode) == (3.0, 0.9, "proximal")
    assert all(torch.equal(old.fisher[n], ewc.fisher[n]) for n in names)
    no_own = EWC(ewc.fisher, ewc.anchor, 3.0)
    no_own.save(tmp_path / "new.safetensors")
    assert EWC.load(tmp_path / "new.safetensors").own_fisher is None


def test_load_rejects_truncated_missing_and_foreign_files(tmp_path: Path) -> None:
    _, ewc = _trained_ewc()
    path = tmp_path / "ewc.safetensors"
    ewc.save(path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(EWCStateError, match=r"truncated\.safetensors"):
        EWC.load(truncated)
    with pytest.raises(FileNotFoundError, match="absent"):
        EWC.load(tmp_path / "absent.safetensors")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(EWCStateError, match="format"):
        EWC.load(tmp_path / "model.safetensors")
    tensors = {f"fisher.{n}": t for n, t in ewc.fisher.items()}
    tensors |= {f"anchor.{n}": t for n, t in ewc.anchor.items()}
    meta = {"format": "evergreen.ewc/2", "lambda": "1.0", "names": json.dumps(list(ewc.fisher))}
    meta["own_names"] = json.dumps(["0.weight"])  # names an own tensor the file lacks
    save_file(tensors, str(tmp_path / "no_own.safetensors"), metadata=meta)
    with pytest.raises(EWCStateError, match="do not match the stored names"):
        EWC.load(tmp_path / "no_own.safetensors")
    del meta["own_names"]
    meta["mode"] = "sideways"
    save_file(tensors, str(tmp_path / "bad_mode.safetensors"), metadata=meta)
    with pytest.raises(EWCStateError, match="mode"):
        EWC.load(tmp_path / "bad_mode.safetensors")


def test_constructor_validates() -> None:
    fisher, anchor = {"w": torch.ones(2)}, {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="non-negative"):
        EWC({"w": -torch.ones(2)}, anchor, lam=1.0)
    with pytest.raises(ValueError, match=r"anchor lacks 1 fisher entries, e.g. \['w'\]"):
        EWC(fisher, {"v": torch.zeros(2)}, lam=1.0)
    assert list(EWC(fisher, {**anchor, "v": torch.zeros(3)}, lam=1.0).anchor) == ["w"]
    with pytest.raises(ValueError, match="gamma"):
        EWC(fisher, anchor, lam=1.0, gamma=1.5)
    with pytest.raises(ValueError, match="lambda"):
        EWC(fisher, anchor, lam=-1.0)
    with pytest.raises(ValueError, match="mode"):
        EWC(fisher, anchor, lam=1.0, mode="adam")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        EWC(fisher, anchor, lam=1.0, kind="fisher")  # type: ignore[arg-type]
    ewc = EWC(fisher, anchor, lam=1.0)
    with pytest.raises(ValueError, match="mode"):
        ewc.mode = "proximl"  # type: ignore[assignment]  # a typo must not switch EWC off
    assert ewc.mode == "proximal"
    with pytest.raises(ValueError, match="own_fisher has entries without a Fisher"):
        EWC(fisher, anchor, lam=1.0, own_fisher={"v": torch.ones(2)})
    with pytest.raises(ValueError, match="own_fisher 'w' must be finite"):
        EWC(fisher, anchor, lam=1.0, own_fisher={"w": torch.tensor([1.0, float("nan")])})
    half = EWC({"w": torch.ones(2, dtype=torch.bfloat16)}, anchor, lam=1.0)
    assert half.fisher["w"].dtype == torch.float32  # accumulated in float32


def test_a_version_anchored_at_its_own_weights_stores_them_once(tmp_path: Path) -> None:
    from safetensors import safe_open

    from continual.models import ModelSpec, build_model
    from tasks.state import ModelState, parameters_of, read_state, write_state

    torch.manual_seed(0)
    spec = ModelSpec(family="mlp", n_features=4, n_classes=3, hidden=[8])
    model = build_model(spec)
    X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    ewc = EWC.from_model(model, X, y, lam=2.0)
    write_state(ModelState(model=model, spec=spec, ewc=ewc), tmp_path / "v1")
    with safe_open(str(tmp_path / "v1" / "ewc.safetensors"), framework="pt") as handle:
        assert not [k for k in handle.keys() if k.startswith("anchor.")]  # noqa: SIM118
    loaded = read_state(tmp_path / "v1")
    assert loaded.ewc is not None
    for name, anchor in ewc.anchor.items():
        assert torch.equal(loaded.ewc.anchor[name], anchor)
    assert torch.equal(loaded.ewc.fisher["classifier.weight"], ewc.fisher["classifier.weight"])
    with pytest.raises(EWCStateError, match="model_parameters"):
        EWC.load(tmp_path / "v1" / "ewc.safetensors")

    # anchored elsewhere (e.g. a merged challenger keeps its parent's anchor): stored in full
    moved = {n: p + 1 for n, p in parameters_of(model).items()}
    other = EWC(ewc.fisher, moved, lam=2.0)
    write_state(ModelState(model=model, spec=spec, ewc=other), tmp_path / "v2")
    again = read_state(tmp_path / "v2")
    assert again.ewc is not None
    assert all(torch.equal(again.ewc.anchor[n], moved[n]) for n in other.anchor)
