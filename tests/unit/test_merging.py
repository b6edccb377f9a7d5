"""Merging on state dicts: closed forms by hand, endpoints, EMA recursion, input validation."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from continual.merging import (
    average,
    ema_over_lineage,
    ema_update,
    fisher_merge,
    fold_delta,
    linear_interpolate,
    merge_lora_deltas,
    parameter_distance,
    refactor_delta,
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
        floor = eps * sum(f[key].mean() for f in fishers) / len(fishers)  # relative, pooled
        num = sum((f[key] + floor) * s[key] for f, s in zip(fishers, states, strict=True))
        den = sum(f[key] + floor for f in fishers)
        torch.testing.assert_close(merged[key], num / den)
    absolute = sum((f["w"] + eps) * s["w"] for f, s in zip(fishers, states, strict=True))
    absolute = absolute / sum(f["w"] + eps for f in fishers)
    assert not torch.allclose(merged["w"], absolute, atol=1e-4)  # the old absolute ε is gone


def test_fisher_merge_is_invariant_to_the_fishers_scale() -> None:
    states = [_state(s) for s in range(3)]
    gen = torch.Generator().manual_seed(4)
    tiny = [{"w": 1e-9 * torch.rand(3, 4, generator=gen) ** 4} for _ in range(3)]
    huge = [{"w": f["w"] * 1e6} for f in tiny]
    for eps in (1e-8, 0.5):
        torch.testing.assert_close(
            fisher_merge(states, tiny, eps=eps)["w"], fisher_merge(states, huge, eps=eps)["w"]
        )

    def absolute(fishers: list[dict[str, Tensor]]) -> Tensor:  # the former rule, F + 1e-8
        num = sum((f["w"] + 1e-8) * s["w"] for f, s in zip(fishers, states, strict=True))
        return num / sum(f["w"] + 1e-8 for f in fishers)

    # the data is sensitive: an absolute floor swamps the tiny Fishers but not the huge ones
    assert not torch.allclose(absolute(tiny), absolute(huge), atol=1e-3)


def test_all_zero_fisher_of_one_tensor_gives_its_plain_mean() -> None:
    states = [_state(s) for s in range(2)]
    fishers = [{"w": torch.zeros(3, 4), "b": torch.rand(4) + 0.1} for _ in range(2)]
    fishers[1]["b"] = fishers[1]["b"] * 5
    merged = fisher_merge(states, fishers, eps=1e-3)
    torch.testing.assert_close(merged["w"], (states[0]["w"] + states[1]["w"]) / 2)
    assert not torch.allclose(merged["b"], (states[0]["b"] + states[1]["b"]) / 2)
    assert torch.isfinite(merged["w"]).all()


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


def _factors(seed: int, rank: int = 2) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(5, rank, generator=gen), torch.randn(rank, 4, generator=gen)  # B, A


def _delta(seed: int, scaling: float = 2.0) -> dict[str, Tensor]:
    b, a = _factors(seed)
    return {"layer.weight": scaling * b @ a, "other.weight": scaling * a.T @ b.T}


def test_merging_lora_is_the_mean_of_products_not_the_product_of_means() -> None:
    (b1, a1), (b2, a2) = _factors(1), _factors(2)
    s = 2.0
    d1, d2 = {"layer.weight": s * b1 @ a1}, {"layer.weight": s * b2 @ a2}
    merged = merge_lora_deltas([d1, d2])["layer.weight"]
    torch.testing.assert_close(merged, s * (b1 @ a1 + b2 @ a2) / 2)
    factor_mean = s * ((b1 + b2) / 2) @ ((a1 + a2) / 2)
    assert (merged - factor_mean).norm() > 0.1 * merged.norm()  # the trap is a real difference
    weighted = merge_lora_deltas([d1, d2], [3.0, 1.0])["layer.weight"]
    torch.testing.assert_close(weighted, s * (3 * b1 @ a1 + b2 @ a2) / 4)


def test_fisher_merge_of_deltas_is_the_hand_formula_and_equals_merging_folded_models() -> None:
    deltas = [_delta(1), _delta(2)]
    gen = torch.Generator().manual_seed(3)
    fishers = [{k: torch.rand(v.shape, generator=gen) for k, v in deltas[0].items()} for _ in "ab"]
    eps, lambdas = 0.1, [1.0, 3.0]
    merged = merge_lora_deltas(deltas, lambdas, fishers=fishers, eps=eps)
    for key, value in merged.items():
        floor = eps * (fishers[0][key].mean() + fishers[1][key].mean()) / 2
        w = [lam * (f[key] + floor) for lam, f in zip(lambdas, fishers, strict=True)]
        torch.testing.assert_close(value, (w[0] * deltas[0][key] + w[1] * deltas[1][key]) / sum(w))
    # W0 is shared, so merging ΔW with the Fisher of W is the Fisher merge of W0 + ΔW_k
    base = {
        "layer.weight": torch.randn(5, 4),
        "other.weight": torch.randn(4, 5),
        "n": torch.ones(1),
    }
    models = [fold_delta(base, d) for d in deltas]
    unweighted = merge_lora_deltas(deltas, fishers=fishers, eps=eps)
    for key, value in fisher_merge(models, fishers, eps=eps).items():
        torch.testing.assert_close(value, fold_delta(base, unweighted)[key])


def test_merge_lora_deltas_validates_and_does_not_mutate() -> None:
    deltas = [_delta(1), _delta(2)]
    before = [_copy(d) for d in deltas]
    fishers = [{k: torch.ones_like(v) for k, v in deltas[0].items()} for _ in deltas]
    merge_lora_deltas(deltas, fishers=fishers)
    for b, d in zip(before, deltas, strict=True):
        _assert_unchanged(b, d)
    with pytest.raises(ValueError, match="at least one delta"):
        merge_lora_deltas([])
    with pytest.raises(ValueError, match="2 deltas but 1 weights"):
        merge_lora_deltas(deltas, [1.0])
    with pytest.raises(ValueError, match="not all zero"):
        merge_lora_deltas(deltas, [0.0, 0.0])
    with pytest.raises(ValueError, match=r"only in the second \['extra.weight'\]"):
        merge_lora_deltas([deltas[0], {**deltas[1], "extra.weight": torch.ones(1)}])
    with pytest.raises(ValueError, match=r"do not cover the deltas \['other.weight'\]"):
        merge_lora_deltas(deltas, fishers=[{"layer.weight": torch.ones(5, 4)}] * 2)
    with pytest.raises(ValueError, match=r"'layer\.weight' has shape"):
        merge_lora_deltas(
            deltas, fishers=[fishers[0], {**fishers[1], "layer.weight": torch.ones(4)}]
        )


def test_fold_delta_adds_and_copies_everything_else() -> None:
    base = {"layer.weight": torch.randn(5, 4), "layer.bias": torch.randn(5), "n": torch.tensor(3)}
    half = {k: v.half() if k == "layer.bias" else v for k, v in base.items()}
    delta = {"layer.weight": torch.randn(5, 4)}
    before = _copy(base)
    folded = fold_delta(base, delta)
    torch.testing.assert_close(folded["layer.weight"], base["layer.weight"] + delta["layer.weight"])
    assert torch.equal(folded["layer.bias"], base["layer.bias"]) and folded["n"].item() == 3
    _assert_unchanged(before, base)
    folded["layer.bias"].add_(1.0)
    assert torch.equal(base["layer.bias"], before["layer.bias"])
    assert fold_delta(half, {"layer.bias": torch.ones(5)})["layer.bias"].dtype == torch.float16
    with pytest.raises(ValueError, match=r"'lora.weight' is not a floating weight"):
        fold_delta(base, {"lora.weight": torch.ones(5, 4)})
    with pytest.raises(ValueError, match=r"'layer.weight' has shape \(4, 5\)"):
        fold_delta(base, {"layer.weight": torch.ones(4, 5)})


def test_refactor_delta_round_trips_at_full_rank_and_reports_truncation() -> None:
    delta = merge_lora_deltas([_delta(1), _delta(2)])  # rank 4 (two rank-2 products), 5×4
    scaling = 0.5
    for rank in (4, 6):  # rank(ΔW), and above min(out, in): padded with zeros
        low = refactor_delta(delta, rank, scaling=scaling)
        for key, d in delta.items():
            assert low.lora_A[key].shape[0] == rank and low.lora_B[key].shape[1] == rank
            torch.testing.assert_close(scaling * low.lora_B[key] @ low.lora_A[key], d)
            assert low.relative_error[key] < 1e-6
    low = refactor_delta(delta, 2, scaling=scaling)
    for key, d in delta.items():
        approx = scaling * low.lora_B[key] @ low.lora_A[key]
        measured = float((d - approx).norm() / d.norm())
        assert measured > 0.05 and low.relative_error[key] == pytest.approx(measured, rel=1e-4)
    assert refactor_delta({"z.weight": torch.zeros(3, 3)}, 2).relative_error == {"z.weight": 0.0}
    with pytest.raises(ValueError, match="rank must be >= 1"):
        refactor_delta(delta, 0)
    with pytest.raises(ValueError, match=r"'v' has shape \(3,\)"):
        refactor_delta({"v": torch.ones(3)}, 2)


def test_average_is_the_plain_mean_and_copies_integer_buffers() -> None:
    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(4)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(9)}
    c = {"w": torch.tensor([5.0, 1.0]), "n": torch.tensor(1)}
    merged = average([a, b, c])
    assert torch.equal(merged["w"], torch.tensor([3.0, 3.0]))
    assert torch.equal(merged["n"], torch.tensor(4))
    assert merged["w"].data_ptr() != a["w"].data_ptr()
    with pytest.raises(ValueError, match="at least one"):
        average([])
    with pytest.raises(ValueError, match="different keys"):
        average([a, {"w": a["w"]}])
