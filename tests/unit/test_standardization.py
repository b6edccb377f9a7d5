"""Standardisation that follows the data (`continual.standardization`, `tasks.train_start`).

A feature that barely varied in the first batch must not be read at its first-batch scale
forever, and versions standardised differently must still merge exactly.
"""

from __future__ import annotations

import torch

from continual.ewc import EWC
from continual.models import ModelSpec, build_model, spec_of
from continual.standardization import (
    FIRST_WEIGHT,
    align_for_merge,
    can_follow,
    rescale_fisher,
    robust_spread,
    widen_,
)
from tasks.memory import DataMemory
from tasks.state import ModelState, parameters_of
from tasks.train_start import follow_data_scale


def _mlp(std: list[float], mean: list[float] | None = None, seed: int = 0):
    torch.manual_seed(seed)
    n = len(std)
    spec = ModelSpec(
        family="mlp",
        n_features=n,
        n_classes=3,
        hidden=[8],
        input_mean=mean or [0.0] * n,
        input_std=std,
        feature_columns=[f"f{i}" for i in range(n)],
    )
    return build_model(spec).eval(), spec


def test_only_features_that_spread_beyond_the_factor_are_widened():
    model, _ = _mlp([1.0, 0.05, 1.0, 1.0])
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    X = torch.randn(500, 4)  # std ≈ 1 everywhere: feature 1 (0.05) spreads 20× further
    X[:, 2] *= 1.8  # below the factor 2: ordinary change, kept
    widening = widen_(model, X)
    assert widening.features == [1]
    std = model.standardize.input_std
    assert torch.allclose(std[[0, 2, 3]], torch.ones(3))
    assert abs(float(std[1]) - float(robust_spread(X)[1])) < 1e-6
    assert abs(float(std[1]) - float(X[:, 1].std(unbiased=False))) < 0.01  # winsorised 0.5 %
    for name, value in model.state_dict().items():  # weights (and the mean) are kept
        if name != "standardize.input_std":
            assert torch.equal(value, weights[name]), name


def test_one_glitch_does_not_widen_a_feature_for_good():
    model, _ = _mlp([1.0, 1.0])
    torch.manual_seed(3)
    X = torch.randn(2000, 2)
    X[7, 0] = 1e6  # one value validation let through
    assert widen_(model, X).features == []
    X[:, 1] *= 5  # every row spreads further: a real change
    assert widen_(model, X).features == [1]


def test_a_std_never_narrows():
    model, _ = _mlp([5.0, 5.0])
    assert widen_(model, torch.zeros(50, 2)).features == []
    assert torch.equal(model.standardize.input_std, torch.tensor([5.0, 5.0]))


def _transformer_spec(std: list[float]) -> ModelSpec:
    return ModelSpec(
        family="transformer", n_features=8, n_classes=3, d_model=8, n_heads=2, n_tokens=2,
        input_std=std,
    )  # fmt: skip


def test_the_transformer_is_widened_too():
    model = build_model(_transformer_spec([0.01] * 8))
    assert can_follow(model)
    assert widen_(model, torch.randn(100, 8)).features == list(range(8))
    assert float(model.standardize.input_std.min()) > 0.5


def test_transformer_versions_get_the_widest_std_approximately():
    torch.manual_seed(0)
    a = build_model(_transformer_spec([0.01] * 8)).state_dict()
    b = build_model(_transformer_spec([1.0] * 8)).state_dict()
    dicts, fishers, exact = align_for_merge([a, b])
    assert not exact and fishers is None
    assert all(torch.equal(d["standardize.input_std"], torch.ones(8)) for d in dicts)
    assert torch.equal(dicts[0]["embed.weight"], a["embed.weight"])  # weights kept as they are


def test_fisher_follows_the_widened_coordinates():
    model, _ = _mlp([1.0, 0.1, 1.0])
    widening = widen_(model, torch.randn(400, 3))  # feature 1: 0.1 → ≈1
    fisher = {FIRST_WEIGHT: torch.ones(8, 3), "layers.0.bias": torch.ones(8)}
    scaled = rescale_fisher(fisher, widening)
    ratio = float(widening.ratio[1])
    assert ratio < 0.2
    assert torch.allclose(scaled[FIRST_WEIGHT][:, 1], torch.full((8,), ratio**2))
    assert torch.equal(scaled[FIRST_WEIGHT][:, [0, 2]], torch.ones(8, 2))
    assert torch.equal(scaled["layers.0.bias"], fisher["layers.0.bias"])


def test_versions_standardised_differently_merge_exactly():
    a, _ = _mlp([1.0, 0.1, 2.0], mean=[0.0, 0.0, 1.0], seed=0)
    b, _ = _mlp([1.0, 3.0, 2.0], mean=[0.5, 0.0, 1.0], seed=1)
    fishers = [{FIRST_WEIGHT: torch.ones(8, 3)}, {FIRST_WEIGHT: torch.ones(8, 3)}]
    dicts, aligned, exact = align_for_merge([a.state_dict(), b.state_dict()], fishers)
    assert exact
    X = torch.randn(64, 3) * 4
    for original, state in zip((a, b), dicts, strict=True):
        assert torch.equal(state["standardize.input_std"], torch.tensor([1.0, 3.0, 2.0]))
        assert torch.equal(state["standardize.input_mean"], torch.tensor([0.0, 0.0, 1.0]))
        rebuilt, _ = _mlp([1.0, 1.0, 1.0])
        rebuilt.load_state_dict(state)
        assert torch.allclose(rebuilt(X), original(X), atol=1e-5)
    assert aligned is not None
    assert torch.allclose(aligned[0][FIRST_WEIGHT][:, 1], torch.full((8,), (0.1 / 3.0) ** 2))
    assert torch.equal(aligned[1][FIRST_WEIGHT], torch.ones(8, 3))


def test_versions_that_agree_are_returned_unchanged():
    a, _ = _mlp([1.0, 2.0], seed=0)
    b, _ = _mlp([1.0, 2.0], seed=1)
    dicts, fishers, exact = align_for_merge([a.state_dict(), b.state_dict()])
    assert fishers is None and exact
    assert all(torch.equal(dicts[1][k], v) for k, v in b.state_dict().items())


def test_an_update_starts_from_a_widened_copy_and_the_champion_is_untouched():
    model, spec = _mlp([1.0, 0.02, 1.0])
    torch.manual_seed(2)
    X, y = torch.randn(200, 3), torch.randint(0, 3, (200,))
    ewc = EWC.from_model(model, X, y, lam=1.0)
    champion = ModelState(model=model, spec=spec, ewc=ewc)
    base = follow_data_scale(champion, X, DataMemory())
    assert base is not champion and base.model is not champion.model
    assert float(champion.model.standardize.input_std[1]) == float(torch.tensor(0.02))
    assert base.spec.input_std[1] > 0.5 and spec.input_std[1] == 0.02
    assert spec_of(base.model) == base.spec and spec_of(champion.model) == spec
    assert base.ewc is not None and ewc.own_fisher is not None
    before, after = ewc.fisher[FIRST_WEIGHT][:, 1], base.ewc.fisher[FIRST_WEIGHT][:, 1]
    assert torch.allclose(after, before * (0.02 / base.spec.input_std[1]) ** 2, rtol=1e-4)
    assert all(torch.equal(v, parameters_of(champion.model)[k]) for k, v in base.ewc.anchor.items())


def test_no_change_returns_the_champion_itself():
    model, spec = _mlp([1.0, 1.0])
    champion = ModelState(model=model, spec=spec)
    assert follow_data_scale(champion, torch.randn(100, 2), DataMemory()) is champion


def test_a_merged_challenger_anchors_ewc_in_the_merged_coordinates():
    """The merge widens feature 1 (0.1 → 3.0): the champion's Fisher on the first-layer weights
    reading it must shrink by (0.1/3)², as a weekly update's widening does."""
    from tasks.merge import _with_weights

    champion_model, champion_spec = _mlp([1.0, 0.1, 2.0], seed=0)
    other, _ = _mlp([1.0, 3.0, 2.0], seed=1)
    fisher = {name: torch.ones_like(p) for name, p in champion_model.named_parameters()}
    champion = ModelState(
        model=champion_model,
        spec=champion_spec,
        version="1",
        ewc=EWC(fisher, parameters_of(champion_model), lam=10.0, normalize=False),
    )
    dicts, _, exact = align_for_merge([champion_model.state_dict(), other.state_dict()])
    assert exact
    merged = _with_weights(champion, dicts[0], champion)
    assert merged.ewc is not None
    first = merged.ewc.fisher[FIRST_WEIGHT]
    assert torch.allclose(first[:, 1], torch.full((8,), (0.1 / 3.0) ** 2))
    assert torch.equal(first[:, [0, 2]], torch.ones(8, 2))
    assert torch.equal(merged.ewc.fisher["layers.0.bias"], fisher["layers.0.bias"])
    assert merged.spec.input_std == [1.0, 3.0, 2.0]


def test_the_run_records_how_many_features_an_update_widened():
    from types import SimpleNamespace

    from tasks.tracking import widening_params

    _, parent_spec = _mlp([1.0, 0.1, 2.0])
    _, child_spec = _mlp([1.0, 3.0, 2.5])
    reg = SimpleNamespace(
        challenger=SimpleNamespace(spec=child_spec), parent=SimpleNamespace(spec=parent_spec)
    )
    assert widening_params(reg) == {"standardize.widened_features": "2"}
    reg.parent = None  # bootstrap: nothing to compare with
    assert widening_params(reg) == {}


def test_the_widened_spec_changes_only_the_widened_features():
    """The run records how many features an update widened by comparing the challenger's
    spec with its parent's (`tasks.tracking.widening_params`): a feature that was not widened
    must keep its parent's std, not count because of a float32 rounding of it (the first
    champion's spec holds float64 stds; a merge writes its buffers, float32), or every feature
    counts as widened."""
    from types import SimpleNamespace

    from tasks.tracking import widening_params

    model, spec = _mlp([1.1, 0.02, 3.3])
    torch.manual_seed(3)
    X = torch.randn(200, 3) * torch.tensor([1.0, 1.0, 3.0])
    base = follow_data_scale(ModelState(model=model, spec=spec), X, DataMemory())
    assert base.spec.input_std is not None and spec.input_std is not None
    pairs = zip(base.spec.input_std, spec.input_std, strict=True)
    assert [j for j, (new, old) in enumerate(pairs) if new != old] == [1]
    assert base.spec.input_std[1] > 0.5
    assert torch.equal(  # the model reads what its spec says, at its buffer's precision
        base.model.standardize.input_std, torch.tensor(base.spec.input_std, dtype=torch.float32)
    )
    merged = torch.tensor([1.1, 3.0, 3.3], dtype=torch.float32).tolist()  # as tasks.merge writes
    _, merged_spec = _mlp(merged)
    reg = SimpleNamespace(
        challenger=SimpleNamespace(spec=merged_spec), parent=SimpleNamespace(spec=spec)
    )
    assert widening_params(reg) == {"standardize.widened_features": "1"}
