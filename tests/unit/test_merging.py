"""Merging on state dicts: closed forms by hand, endpoints, EMA recursion, input validation."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from continual.merging import (
    ema_over_lineage,
    ema_update,
    fisher_merge,
    linear_interpolate,
    parameter_distance,
)


def _state(seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 4, generator=gen),
        "b": torch.randn(4, generator=gen),
        "input_mean": torch.randn(4, generator=gen),  # a float buffer without Fisher
        "steps": torch.tensor(seed, dtype=torch.long),  # an integer buffer
    }


def _copy(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in state.items()}


def _assert_unchanged(before: dict[str, Tensor], after: dict[str, Tensor]) -> None:
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fisher_merge_matches_hand_computed_closed_form() -> None:
    a = {"w": torch.tensor([1.0, 2.0, 4.0]), "mean": torch.tensor([0.0]), "n": torch.tensor(7)}
    b = {"w": torch.tensor([3.0, 6.0, 8.0]), "mean": torch.tensor([2.0]), "n": torch.tensor(9)}
    fa, fb = {"w": torch.tensor([1.0, 0.0, 2.0])}, {"w": torch.tensor([3.0, 1.0, 2.0])}
    merged = fisher_merge([a, b], [fa, fb], eps=1e-12)
    # (1·1 + 3·3)/4 = 2.5; (0·2 + 1·6)/1 = 6; (2·4 + 2·8)/4 = 6
    torch.testing.assert_close(merged["w"], torch.tensor([2.5, 6.0, 6.0]))
    torch.testing.assert_close(merged["mean"], torch.tensor([1.0]))  # no Fisher: plain mean
    assert merged["n"].item() == 7 and merged["n"].dtype == torch.long  # first model's value


def test_fisher_merge_with_epsilon_is_the_documented_formula() -> None:
    states = [_state(s) for s in range(3)]
    gen = torch.Generator().manual_seed(9)
    fishers = [
        {"w": torch.rand(3, 4, generator=gen), "b": torch.rand(4, generator=gen)} for _ in range(3)
    ]
    eps = 0.1
    merged = fisher_merge(states, fishers, eps=eps)
    for key in ("w", "b"):
        num = sum((f[key] + eps) * s[key] for f, s in zip(fishers, states, strict=True))
        den = sum(f[key] + eps for f in fishers)
        torch.testing.assert_close(merged[key], num / den)


def test_equal_or_zero_fishers_give_the_plain_average() -> None:
    states = [_state(s) for s in range(3)]
    mean_w = sum(s["w"] for s in states) / 3
    same = {"w": torch.full((3, 4), 0.7), "b": torch.full((4,), 0.7)}
    zero = {"w": torch.zeros(3, 4), "b": torch.zeros(4)}
    for fisher in (same, zero):
        merged = fisher_merge(states, [fisher] * 3)
        torch.testing.assert_close(merged["w"], mean_w)


def test_huge_fisher_in_one_model_selects_that_model() -> None:
    states = [_state(s) for s in range(3)]
    fishers = [{"w": torch.ones(3, 4), "b": torch.ones(4)} for _ in range(3)]
    fishers[1]["w"][0, 2] = 1e9
    merged = fisher_merge(states, fishers)
    torch.testing.assert_close(merged["w"][0, 2], states[1]["w"][0, 2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(merged["w"][1], sum(s["w"][1] for s in states) / 3)


def test_fisher_merge_does_not_mutate_and_validates() -> None:
    states = [_state(0), _state(1)]
    fishers = [{"w": torch.ones(3, 4)}, {"w": torch.ones(3, 4)}]
    before = [_copy(s) for s in states]
    fisher_merge(states, fishers)
    for b, s in zip(before, states, strict=True):
        _assert_unchanged(b, s)
    with pytest.raises(ValueError, match="2 states but 1 Fishers"):
        fisher_merge(states, fishers[:1])
    with pytest.raises(ValueError, match="'w' has shape"):
        fisher_merge(states, [fishers[0], {"w": torch.ones(4, 3)}])
    with pytest.raises(ValueError, match="non-negative"):
        fisher_merge(states, [fishers[0], {"w": -torch.ones(3, 4)}])
    with pytest.raises(ValueError, match="different parameters"):
        fisher_merge(states, [fishers[0], {"b": torch.ones(4)}])
    odd = _state(2)
    odd["w"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="'w' has shape"):
        fisher_merge([states[0], odd], fishers)


def test_interpolation_endpoints_midpoint_and_int_buffers() -> None:
    a, b = _state(0), _state(1)
    before_a, before_b = _copy(a), _copy(b)
    at_one, at_zero = linear_interpolate(a, b, 1.0), linear_interpolate(a, b, 0.0)
    for key in ("w", "b", "input_mean"):
        assert torch.equal(at_one[key], a[key]) and torch.equal(at_zero[key], b[key])
    mid = linear_interpolate(a, b, 0.25)
    torch.testing.assert_close(mid["w"], 0.25 * a["w"] + 0.75 * b["w"])
    assert mid["steps"].item() == 0  # non-float taken from a
    _assert_unchanged(before_a, a)
    _assert_unchanged(before_b, b)
    at_one["w"].add_(1.0)  # outputs are fresh tensors, not views of the inputs
    assert torch.equal(a["w"], before_a["w"])


def test_interpolation_validates_keys_shapes_and_alpha() -> None:
    a, b = _state(0), _state(1)
    with pytest.raises(ValueError, match=r"only in the first \['b'\]"):
        linear_interpolate(a, {k: v for k, v in b.items() if k != "b"}, 0.5)
    with pytest.raises(ValueError, match="'w' has shape"):
        linear_interpolate(a, {**b, "w": torch.zeros(4, 3)}, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        linear_interpolate(a, b, 1.5)


def test_ema_over_lineage_equals_recursive_formula() -> None:
    s1, s2, s3 = _state(1), _state(2), _state(3)
    d = 0.8
    expected = d * (d * s1["w"] + (1 - d) * s2["w"]) + (1 - d) * s3["w"]
    merged = ema_over_lineage([s1, s2, s3], d)
    torch.testing.assert_close(merged["w"], expected)
    assert merged["steps"].item() == 3  # integer buffers follow the newest state
    torch.testing.assert_close(ema_update(s1, s2, d)["b"], d * s1["b"] + (1 - d) * s2["b"])
    assert torch.equal(ema_over_lineage([s1], d)["w"], s1["w"])
    with pytest.raises(ValueError, match="at least one"):
        ema_over_lineage([], d)


def test_merged_state_loads_into_a_model() -> None:
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)) for _ in range(2)]
    states = [m.state_dict() for m in models]
    fishers = [{n: torch.rand_like(p) for n, p in m.named_parameters()} for m in models]
    target = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    target.load_state_dict(fisher_merge(states, fishers))
    target.load_state_dict(linear_interpolate(states[0], states[1], 0.5))


def test_parameter_distance() -> None:
    a = {"w": torch.tensor([3.0, 0.0]), "n": torch.tensor(1)}
    b = {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(2), "extra": torch.ones(1)}
    assert parameter_distance(b, b) == 0.0
    assert parameter_distance(a, b) == pytest.approx(5.0 / 4.0)
    assert parameter_distance(a, {"w": torch.zeros(2)}) == float("inf")
    with pytest.raises(ValueError, match="share no floating"):
        parameter_distance({"n": torch.tensor(1)}, {"n": torch.tensor(1)})
