"""EWC: per-example Fisher against a brute-force reference, penalty and its gradient, online
consolidation and the safetensors round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from continual.ewc import (
    EWC,
    EWCStateError,
    brute_force_fisher,
    diagonal_fisher,
    fisher_paths,
)


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )


class _ScaledDotAttention(nn.Module):
    """Custom attention-like layer: raw Parameters used via matmul (no nn.Linear)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.qk = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.gate = nn.Parameter(torch.ones(d))

    def forward(self, h: Tensor) -> Tensor:
        scores = (h @ self.qk) @ h.transpose(1, 2) / h.shape[-1] ** 0.5
        return torch.softmax(scores, dim=-1) @ h * self.gate


class _TokenModel(nn.Module):
    """Embedding, LayerNorm, custom attention, MultiheadAttention (vmap) + an MLP head (closed
    form), on token ids: both paths in one model."""

    def __init__(self, vocab: int = 30, d: int = 12, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.custom = _ScaledDotAttention(d)
        self.mha = nn.MultiheadAttention(d, 2, batch_first=True)
        self.fc = nn.Linear(d, 24)
        self.head = nn.Linear(24, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.norm(self.embed(tokens))
        h = h + self.custom(h)
        h = h + self.mha(h, h, h, need_weights=False)[0]
        return self.head(torch.tanh(self.fc(h.mean(dim=1))))


class _SequenceLinear(nn.Module):
    """Linear layers on [B, T, D] inputs, one of them called twice: the per-example grad is
    Σ_t g_t a_tᵀ (over tokens and calls), not a per-token square."""

    def __init__(self, d: int = 5, hidden: int = 7, classes: int = 3) -> None:
        super().__init__()
        self.proj = nn.Linear(d, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mix(torch.tanh(self.mix(torch.tanh(self.proj(x)))))
        return self.head(h.mean(dim=1))


class _Traps(nn.Module):
    """Traps for the closed form: tied weights and a [T, B, D] (time-major) layout."""

    def __init__(self, d: int = 6, classes: int = 4) -> None:
        super().__init__()
        self.time_major = nn.Linear(d, d)
        self.tied = nn.Linear(d, d, bias=False)
        self.tied_twin = nn.Linear(d, d, bias=False)
        self.tied_twin.weight = self.tied.weight
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.time_major(x.transpose(0, 1)).transpose(0, 1)
        h = self.tied_twin(torch.tanh(self.tied(h)))
        return self.head(h.mean(dim=1))


def _data(kind: str, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if kind == "tokens":
        return torch.randint(0, 30, (n, 5), generator=gen), torch.randint(0, 3, (n,), generator=gen)
    if kind == "sequence":
        return torch.randn(n, 4, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    if kind == "traps":
        return torch.randn(n, 3, 6, generator=gen), torch.randint(0, 4, (n,), generator=gen)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 4, (n,), generator=gen)


CASES = {
    "mlp": (_mlp, "flat"),
    "tokens": (_TokenModel, "tokens"),
    "sequence": (_SequenceLinear, "sequence"),
    "traps": (_Traps, "traps"),
}


def _assert_fisher_close(got: dict[str, Tensor], want: dict[str, Tensor], rtol: float) -> None:
    assert list(got) == list(want)
    scale = max(float(v.abs().max()) for v in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=rtol * scale, msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_fisher_matches_brute_force(case: str) -> None:
    torch.manual_seed(0)
    build, kind = CASES[case]
    model = build()
    X, y = _data(kind, 40)
    fast = diagonal_fisher(model, X, y, batch_size=16, chunk_size=8)
    _assert_fisher_close(fast, brute_force_fisher(model, X, y), rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_fisher_matches_brute_force_in_float64(case: str) -> None:
    torch.manual_seed(1)
    build, kind = CASES[case]
    model = build().double()
    X, y = _data(kind, 24, seed=1)
    X = X if kind == "tokens" else X.double()
    fast = diagonal_fisher(model, X, y, batch_size=10, chunk_size=4)
    _assert_fisher_close(fast, brute_force_fisher(model, X, y), rtol=1e-10)


def test_paths_closed_form_for_linear_vmap_for_the_rest() -> None:
    torch.manual_seed(0)
    assert set(fisher_paths(_mlp(), *_data("flat", 8)).values()) == {"linear"}
    assert set(fisher_paths(_SequenceLinear(), *_data("sequence", 8)).values()) == {"linear"}
    tokens = fisher_paths(_TokenModel(), *_data("tokens", 8))
    assert tokens["fc.weight"] == tokens["head.bias"] == "linear"
    for name in ("embed.weight", "norm.weight", "custom.qk", "mha.in_proj_weight"):
        assert tokens[name] == "vmap"
    # MultiheadAttention uses out_proj.weight without calling out_proj: the probe must notice.
    assert tokens["mha.out_proj.weight"] == "vmap"
    traps = fisher_paths(_Traps(), *_data("traps", 8))
    assert traps["time_major.weight"] == "vmap"  # [T, B, D] layout
    assert traps["tied.weight"] == "vmap"  # tied with tied_twin


def test_probe_rejects_wrong_layouts_even_when_gradients_are_tiny() -> None:
    torch.manual_seed(0)
    model = _Traps()
    model.tied.requires_grad_(False)  # only Linear layers left: no vmap pass to fall into anyway
    with torch.no_grad():
        model.head.weight.mul_(1e-7)  # per-example grads ~1e-8: an absolute tolerance would pass
    X, y = _data("traps", 16)
    assert fisher_paths(model, X, y)["time_major.weight"] == "vmap"
    _assert_fisher_close(diagonal_fisher(model, X, y), brute_force_fisher(model, X, y), rtol=1e-5)


def test_vmap_only_path_matches_too() -> None:
    torch.manual_seed(0)
    model = _TokenModel()
    X, y = _data("tokens", 24)
    slow = diagonal_fisher(model, X, y, chunk_size=5, linear_fast_path=False)
    _assert_fisher_close(slow, brute_force_fisher(model, X, y), rtol=1e-5)


def test_fisher_does_not_depend_on_batch_size() -> None:
    torch.manual_seed(0)
    model = _TokenModel()
    X, y = _data("tokens", 36)
    reference = diagonal_fisher(model, X, y, batch_size=36)
    for batch_size, chunk_size in ((3, 2), (7, 3), (16, 64)):
        got = diagonal_fisher(model, X, y, batch_size=batch_size, chunk_size=chunk_size)
        _assert_fisher_close(got, reference, rtol=1e-5)


def test_squared_mini_batch_gradient_is_the_trap() -> None:
    """Squaring the gradient of a batch mean gives ~F/|B|: λ would depend on the batch size."""
    torch.manual_seed(0)
    model = _mlp()
    X, y = _data("flat", 512)
    fisher = diagonal_fisher(model, X, y)
    batch = 32
    naive = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for start in range(0, len(X), batch):
        loss = F.cross_entropy(model(X[start : start + batch]), y[start : start + batch])
        for (name, _), g in zip(
            model.named_parameters(),
            torch.autograd.grad(loss, list(model.parameters())),
            strict=True,
        ):
            naive[name] += g.square() / (len(X) // batch)
    ratio = sum(float(f.sum()) for f in fisher.values()) / sum(
        float(v.sum()) for v in naive.values()
    )
    assert batch / 4 < ratio < 2 * batch, ratio


def test_fisher_leaves_grads_and_modes_alone() -> None:
    torch.manual_seed(0)
    model = _TokenModel()
    model.train()
    model.norm.eval()  # a deliberately frozen submodule keeps its own mode
    model.fc.weight.grad = torch.full_like(model.fc.weight, 3.0)
    diagonal_fisher(model, *_data("tokens", 8))
    assert model.training and model.fc.training and not model.norm.training
    assert torch.equal(model.fc.weight.grad, torch.full_like(model.fc.weight, 3.0))
    assert model.head.weight.grad is None


def test_fisher_covers_only_trainable_params_and_rejects_bad_loss() -> None:
    torch.manual_seed(0)
    model = _mlp()
    model[0].requires_grad_(False)
    X, y = _data("flat", 8)
    assert list(diagonal_fisher(model, X, y)) == ["2.weight", "2.bias", "4.weight", "4.bias"]
    with pytest.raises(ValueError, match="one loss per example"):
        diagonal_fisher(model, X, y, loss_fn=F.cross_entropy)
    with pytest.raises(ValueError, match="same, non-zero number of rows"):
        diagonal_fisher(model, X, y[:3])


def _trained_ewc(lam: float = 3.0, gamma: float = 1.0) -> tuple[nn.Module, EWC]:
    torch.manual_seed(0)
    model = _mlp()
    return model, EWC.from_model(model, *_data("flat", 64), lam=lam, gamma=gamma)


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


def test_penalty_gradient_equals_autograd() -> None:
    model, ewc = _trained_ewc(lam=7.0)
    anchor = ewc.anchor
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    F_, lam = ewc.fisher, ewc.lam
    graph = sum(lam * (F_[n] * (p - anchor[n]).square()).sum() for n, p in model.named_parameters())
    expected = torch.autograd.grad(graph, list(model.parameters()))
    existing = [torch.randn_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), existing, strict=True):
        p.grad = g.clone()
    ewc.add_penalty_grad_(model)
    for p, g, e in zip(model.parameters(), existing, expected, strict=True):
        torch.testing.assert_close(p.grad, g + e, rtol=1e-6, atol=1e-6)


def test_penalty_gradient_only_touches_trainable_params_with_fisher() -> None:
    model, ewc = _trained_ewc()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    model[0].requires_grad_(False)
    frozen_grad = torch.full_like(model[0].weight, 5.0)
    model[0].weight.grad = frozen_grad.clone()
    ewc.add_penalty_grad_(model)
    assert torch.equal(model[0].weight.grad, frozen_grad) and model[0].bias.grad is None
    assert model[2].weight.grad is not None and float(model[2].weight.grad.abs().sum()) > 0
    # Unfreezing changes the trainable set: the cached plan must be rebuilt.
    model[0].requires_grad_(True)
    ewc.add_penalty_grad_(model)
    assert model[0].bias.grad is not None and float(model[0].bias.grad.abs().sum()) > 0


def test_penalty_names_missing_parameters() -> None:
    _, ewc = _trained_ewc()
    with pytest.raises(KeyError, match="renamed or wrapped"):
        ewc.penalty(nn.Sequential(nn.Linear(6, 4)))


def test_consolidate_decays_old_fisher_and_moves_anchor() -> None:
    model, ewc = _trained_ewc(gamma=0.5)
    old = ewc.fisher
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2)
    X2, y2 = _data("flat", 48, seed=5)
    fresh = diagonal_fisher(model, X2, y2)
    ewc.consolidate(model, X2, y2)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ewc.fisher[name], 0.5 * old[name] + fresh[name])
        assert torch.equal(ewc.anchor[name], p.detach())
    assert float(ewc.penalty(model)) == 0.0
    with torch.no_grad():
        model[0].weight.add_(1.0)  # the anchor is a copy, not a view of the live weights
    assert not torch.equal(ewc.anchor["0.weight"], model[0].weight.detach())


def test_save_load_round_trip_is_bit_exact(tmp_path: Path) -> None:
    _, ewc = _trained_ewc(lam=1234.5678, gamma=0.9)
    path = tmp_path / "nested" / "ewc.safetensors"
    ewc.save(path, metadata={"batch_id": "2026-11-21"})
    assert [p.name for p in path.parent.iterdir()] == ["ewc.safetensors"]  # no temp file left
    loaded = EWC.load(path)
    assert (loaded.lam, loaded.gamma) == (ewc.lam, ewc.gamma)
    assert loaded.metadata == {"batch_id": "2026-11-21"}
    for mine, theirs in ((ewc.fisher, loaded.fisher), (ewc.anchor, loaded.anchor)):
        assert list(mine) == list(theirs)
        assert all(
            torch.equal(mine[n], theirs[n]) and mine[n].dtype == theirs[n].dtype for n in mine
        )
    assert EWC.load(path, lam=1.0, gamma=0.5).lam == 1.0


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
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(EWCStateError, match="format"):
        EWC.load(tmp_path / "model.safetensors")


def test_constructor_validates() -> None:
    fisher, anchor = {"w": torch.ones(2)}, {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="non-negative"):
        EWC({"w": -torch.ones(2)}, anchor, lam=1.0)
    with pytest.raises(ValueError, match=r"anchor lacks 1 Fisher entries, e.g. \['w'\]"):
        EWC(fisher, {"v": torch.zeros(2)}, lam=1.0)
    assert list(EWC(fisher, {**anchor, "v": torch.zeros(3)}, lam=1.0).anchor) == ["w"]
    with pytest.raises(ValueError, match="gamma"):
        EWC(fisher, anchor, lam=1.0, gamma=1.5)
    with pytest.raises(ValueError, match="lambda"):
        EWC(fisher, anchor, lam=-1.0)
