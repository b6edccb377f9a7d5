"""Per-example diagonal Fisher (continual/fisher.py): every kind against a brute-force autograd
loop, on the closed-form Linear path and the vmap path, plus the traps it exists to avoid."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from continual.fisher import diagonal_fisher, fisher_paths
from continual.fisher_kinds import TRUE_FISHER_MAX_CLASSES
from continual.fisher_reference import brute_force_fisher
from continual.models import ModelSpec, build_model

KINDS = ["empirical", "true", "sampled"]


def _mlp(classes: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, classes)
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


def _product_model(family: str) -> nn.Module:
    """The product's own MLP / tabular transformer (continual.models), 10 classes."""
    spec = ModelSpec(family, 64, 10, hidden=[32, 32], d_model=16, n_heads=2, n_layers=2)
    return build_model(spec)


def _data(kind: str, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if kind == "tokens":
        return torch.randint(0, 30, (n, 5), generator=gen), torch.randint(0, 3, (n,), generator=gen)
    if kind == "sequence":
        return torch.randn(n, 4, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    if kind == "traps":
        return torch.randn(n, 3, 6, generator=gen), torch.randint(0, 4, (n,), generator=gen)
    if kind == "features":
        return torch.randn(n, 64, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 4, (n,), generator=gen)


CASES = {
    "mlp": (_mlp, "flat"),
    "tokens": (_TokenModel, "tokens"),
    "sequence": (_SequenceLinear, "sequence"),
    "traps": (_Traps, "traps"),
    "product mlp": (lambda: _product_model("mlp"), "features"),
    "product transformer": (lambda: _product_model("transformer"), "features"),
}


def _relative_error(got: dict[str, Tensor], want: dict[str, Tensor]) -> float:
    assert list(got) == list(want)
    scale = max(float(v.abs().max()) for v in want.values())
    return max(float((got[n].double() - want[n].double()).abs().max()) for n in want) / scale


def _assert_fisher_close(got: dict[str, Tensor], want: dict[str, Tensor], rtol: float) -> None:
    assert list(got) == list(want)
    scale = max(float(v.abs().max()) for v in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=rtol * scale, msg=name)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(CASES))
def test_every_kind_matches_brute_force(case: str, kind: str) -> None:
    torch.manual_seed(0)
    build, data = CASES[case]
    model = build()
    X, y = _data(data, 40)
    fast = diagonal_fisher(model, X, y, kind=kind, n_samples=3, batch_size=16, chunk_size=8)
    slow = brute_force_fisher(model, X, y, kind=kind, n_samples=3)
    assert _relative_error(fast, slow) < 2e-6
    _assert_fisher_close(fast, slow, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["mlp", "tokens", "sequence", "traps"])
def test_every_kind_matches_brute_force_in_float64(case: str, kind: str) -> None:
    torch.manual_seed(1)
    build, data = CASES[case]
    model = build().double()
    X, y = _data(data, 24, seed=1)
    X = X if data == "tokens" else X.double()
    fast = diagonal_fisher(model, X, y, kind=kind, batch_size=10, chunk_size=4)
    assert _relative_error(fast, brute_force_fisher(model, X, y, kind=kind)) < 1e-12


def _smoothed_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits, target, reduction="none", label_smoothing=0.1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["mlp", "tokens"])
def test_custom_loss_matches_brute_force(case: str, kind: str) -> None:
    """A loss other than the default takes the generic per-class path (no closed forms)."""
    torch.manual_seed(2)
    build, data = CASES[case]
    model = build()
    X, y = _data(data, 30, seed=2)
    fast = diagonal_fisher(model, X, y, kind=kind, loss_fn=_smoothed_cross_entropy)
    slow = brute_force_fisher(model, X, y, _smoothed_cross_entropy, kind=kind)
    assert _relative_error(fast, slow) < 2e-6


def test_true_fisher_of_a_binary_and_a_very_confident_model() -> None:
    """Cross-entropy's true Fisher uses C − 1 backward vectors; edge cases of that factor."""
    torch.manual_seed(3)
    X, y = _data("flat", 30, seed=3)
    binary = _mlp(classes=2)
    assert (
        _relative_error(
            diagonal_fisher(binary, X, y % 2, kind="true"), brute_force_fisher(binary, X, y % 2)
        )
        < 2e-6
    )
    confident = _mlp()
    with torch.no_grad():
        confident[4].weight.mul_(30.0)  # predictive probabilities down to ~1e-30
    fast = diagonal_fisher(confident, X, y, kind="true")
    assert all(bool(torch.isfinite(v).all()) for v in fast.values())
    assert _relative_error(fast, brute_force_fisher(confident, X, y, kind="true")) < 1e-5


def test_sampled_is_an_unbiased_estimate_of_the_true_fisher() -> None:
    torch.manual_seed(4)
    model = _mlp()
    X, y = _data("flat", 16, seed=4)
    true = diagonal_fisher(model, X, y, kind="true")
    one = diagonal_fisher(model, X, y, kind="sampled", seed=7)
    many = diagonal_fisher(model, X, y, kind="sampled", n_samples=2000, seed=7)
    assert _relative_error(one, true) > 0.02  # one draw per example is noisy...
    assert _relative_error(many, true) < 0.02  # ...but its mean is the true Fisher
    assert _relative_error(diagonal_fisher(model, X, y, kind="sampled", seed=7), one) == 0.0
    assert _relative_error(diagonal_fisher(model, X, y, kind="sampled", seed=8), one) > 0


def test_true_and_sampled_ignore_labels_empirical_feeds_on_a_bad_fit() -> None:
    """The trap: on drifted labels the empirical Fisher explodes; the true one does not move."""
    torch.manual_seed(5)
    model = _mlp()
    X, _ = _data("flat", 256, seed=5)
    with torch.no_grad():
        y = model(X).argmax(-1)  # labels the model fits well...
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    drifted = (y + 1) % 4  # ...and the same inputs after a label drift
    fisher = {
        (kind, name): diagonal_fisher(model, X, labels, kind=kind)
        for kind in KINDS
        for name, labels in (("fit", y), ("drift", drifted))
    }

    def mean(f: dict[str, Tensor]) -> float:
        return sum(float(v.sum()) for v in f.values()) / sum(v.numel() for v in f.values())

    assert mean(fisher["empirical", "drift"]) > 10 * mean(fisher["empirical", "fit"])
    for kind in ("true", "sampled"):
        assert _relative_error(fisher[kind, "drift"], fisher[kind, "fit"]) == 0.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_gets_a_float32_fisher(dtype: torch.dtype, kind: str) -> None:
    """Squares are taken in float32: fp16 squares of small gradients would underflow."""
    torch.manual_seed(6)
    for build, data in (CASES["mlp"], CASES["tokens"]):
        model = build()
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():
            head.weight.mul_(1e-2)  # small gradients everywhere below the head
        X, y = _data(data, 48, seed=6)
        reference = diagonal_fisher(model, X, y, kind=kind)
        half = copy.deepcopy(model).to(dtype)
        got = diagonal_fisher(half, X if data == "tokens" else X.to(dtype), y, kind=kind)
        assert {v.dtype for v in got.values()} == {torch.float32}
        errors = torch.cat(
            [((got[n] - r).abs() / r)[r > 0] for n, r in reference.items()]
        )  # per entry; half precision keeps 3-4 significant digits
        assert float(errors.median()) < 1e-2, float(errors.median())


def test_auto_is_true_up_to_the_class_limit_then_sampled() -> None:
    torch.manual_seed(7)
    X, y = _data("flat", 20, seed=7)
    for classes, expected in ((TRUE_FISHER_MAX_CLASSES, "true"), (17, "sampled")):
        model = _mlp(classes=classes)
        auto = diagonal_fisher(model, X, y, kind="auto")
        assert _relative_error(auto, diagonal_fisher(model, X, y, kind=expected)) == 0.0
        assert _relative_error(brute_force_fisher(model, X, y), auto) < 2e-6


def test_kind_and_samples_are_validated() -> None:
    X, y = _data("flat", 8)
    with pytest.raises(ValueError, match="unknown Fisher kind 'expected'"):
        diagonal_fisher(_mlp(), X, y, kind="expected")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_samples"):
        diagonal_fisher(_mlp(), X, y, kind="sampled", n_samples=0)


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


@pytest.mark.parametrize("kind", KINDS)
def test_vmap_only_path_matches_too(kind: str) -> None:
    torch.manual_seed(0)
    model = _TokenModel()
    X, y = _data("tokens", 24)
    slow = diagonal_fisher(model, X, y, kind=kind, chunk_size=5, linear_fast_path=False)
    _assert_fisher_close(slow, brute_force_fisher(model, X, y, kind=kind), rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_fisher_does_not_depend_on_batch_or_chunk_size(kind: str) -> None:
    torch.manual_seed(0)
    model = _TokenModel()
    X, y = _data("tokens", 36)
    reference = diagonal_fisher(model, X, y, kind=kind, batch_size=36)
    for batch_size, chunk_size in ((3, 2), (7, 3), (16, 64), (10, None)):
        got = diagonal_fisher(model, X, y, kind=kind, batch_size=batch_size, chunk_size=chunk_size)
        _assert_fisher_close(got, reference, rtol=1e-5)


def test_memory_bound_takes_per_example_gradients_one_at_a_time(monkeypatch) -> None:
    """Above the memory budget the K backward vectors of an example are not vmapped at once."""
    import continual.fisher as fisher_module

    torch.manual_seed(0)
    model = _TokenModel()
    X, y = _data("tokens", 12)
    monkeypatch.setattr(fisher_module, "_CHUNK_VALUES", 1000)
    got = diagonal_fisher(model, X, y, kind="true")
    _assert_fisher_close(got, brute_force_fisher(model, X, y, kind="true"), rtol=1e-5)


def test_squared_mini_batch_gradient_is_the_trap() -> None:
    """Squaring the gradient of a batch mean gives ~F/|B|: λ would depend on the batch size."""
    torch.manual_seed(0)
    model = _mlp()
    X, y = _data("flat", 512)
    fisher = diagonal_fisher(model, X, y, kind="empirical")
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
    for kind in KINDS:
        diagonal_fisher(model, *_data("tokens", 8), kind=kind)
    assert model.training and model.fc.training and not model.norm.training
    assert torch.equal(model.fc.weight.grad, torch.full_like(model.fc.weight, 3.0))
    assert model.head.weight.grad is None


def test_fisher_covers_only_trainable_params_and_rejects_bad_loss() -> None:
    torch.manual_seed(0)
    model = _mlp()
    model[0].requires_grad_(False)
    X, y = _data("flat", 8)
    assert list(diagonal_fisher(model, X, y)) == ["2.weight", "2.bias", "4.weight", "4.bias"]
    for kind in KINDS:
        with pytest.raises(ValueError, match="one loss per example"):
            diagonal_fisher(model, X, y, kind=kind, loss_fn=F.cross_entropy)
    with pytest.raises(ValueError, match="same, non-zero number of rows"):
        diagonal_fisher(model, X, y[:3])
