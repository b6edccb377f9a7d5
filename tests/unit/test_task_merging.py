"""TIES and DARE on task vectors: peft's functions against brute-force references by hand."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from continual.lora import LoraSettings, adapter_state_dict, attach_lora, merge_adapter
from continual.lora_merge import lora_delta_weights, lora_scalings
from continual.task_merging import (
    apply_task_vector,
    merge_task_vectors,
    task_merge,
    task_vectors,
)


def _ties_by_hand(vectors: list[Tensor], density: float) -> Tensor:
    """TIES, element by element with Python loops: trim to the top-k by magnitude, elect the
    sign of the sum, mean of the kept entries that agree with it."""
    flat = [v.flatten().tolist() for v in vectors]
    n = len(flat[0])
    k = int(density * n)
    trimmed = []
    for values in flat:
        order = sorted(range(n), key=lambda i, vs=values: -abs(vs[i]))[:k]
        trimmed.append([values[i] if i in order else 0.0 for i in range(n)])
    out = []
    for i in range(n):
        column = [t[i] for t in trimmed]
        sign = 1.0 if sum(column) >= 0 else -1.0
        agreeing = [c for c in column if c != 0 and (c > 0) == (sign > 0)]
        out.append(sum(agreeing) / len(agreeing) if agreeing else 0.0)
    return torch.tensor(out).reshape(vectors[0].shape)


def test_ties_matches_the_brute_force_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    vectors = [torch.randn(5, 6, generator=gen) for _ in range(3)]
    for density in (0.2, 0.5, 1.0):
        merged = merge_task_vectors([{"w": v} for v in vectors], "ties", density=density)
        torch.testing.assert_close(merged["w"], _ties_by_hand(vectors, density))


def test_ties_small_example_by_hand() -> None:
    # density 2/3 keeps the two largest of each; signs elected by the kept sum
    a = {"w": torch.tensor([3.0, -1.0, 2.0])}  # kept: 3, 2
    b = {"w": torch.tensor([-1.0, -4.0, 5.0])}  # kept: -4, 5
    merged = merge_task_vectors([a, b], "ties", density=2 / 3)
    # entry 0: only 3 kept → 3; entry 1: only -4 → -4; entry 2: 2 and 5 agree → 3.5
    torch.testing.assert_close(merged["w"], torch.tensor([3.0, -4.0, 3.5]))


def test_ties_elects_the_sign_by_total_mass_not_by_count() -> None:
    vectors = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([1.0])}, {"w": torch.tensor([-5.0])}]
    merged = merge_task_vectors(vectors, "ties", density=1.0)
    torch.testing.assert_close(merged["w"], torch.tensor([-5.0]))  # sum −3 → negative wins


def test_dare_is_reproducible_with_a_seed_and_differs_across_seeds() -> None:
    gen = torch.Generator().manual_seed(1)
    vectors = [{"w": torch.randn(20, 20, generator=gen)} for _ in range(2)]
    first = merge_task_vectors(vectors, "dare", density=0.3, seed=7)
    torch.manual_seed(123)  # the global generator's state does not matter
    again = merge_task_vectors(vectors, "dare", density=0.3, seed=7)
    other = merge_task_vectors(vectors, "dare", density=0.3, seed=8)
    assert torch.equal(first["w"], again["w"])
    assert not torch.equal(first["w"], other["w"])


def test_dare_leaves_the_global_generator_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    merge_task_vectors([{"w": torch.ones(50)}], "dare", density=0.5, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_dare_mask_does_not_depend_on_the_other_tensors() -> None:
    w = torch.arange(1.0, 101.0)
    alone = merge_task_vectors([{"w": w}], "dare", density=0.4, seed=3)
    with_more = merge_task_vectors([{"a": torch.ones(77), "w": w}], "dare", density=0.4, seed=3)
    assert torch.equal(alone["w"], with_more["w"])


def test_dare_is_unbiased_and_rescales_by_one_over_density() -> None:
    tau_a, tau_b = torch.linspace(-2.0, 3.0, 40), torch.linspace(1.0, -1.0, 40)
    density, draws = 0.25, 4000
    total = torch.zeros(40)
    for seed in range(draws):
        one = merge_task_vectors([{"w": tau_a}, {"w": tau_b}], "dare", density=density, seed=seed)
        survivors = one["w"]
        total += survivors
    mean = total / draws
    expected = (tau_a + tau_b) / 2  # E[mask/density·τ] = τ, then the mean over the two
    # std of one draw per entry ≤ max|τ|/2·sqrt((1−p)/p) ≈ 2.6; over 4000 draws ≈ 0.04
    assert float((mean - expected).abs().max()) < 0.2
    # a single draw's survivors are τ/density (one vector, so no averaging blurs it)
    one = merge_task_vectors([{"w": tau_a}], "dare", density=density, seed=0)["w"]
    kept = one != 0
    torch.testing.assert_close(one[kept], tau_a[kept] / density)
    assert 0 < int(kept.sum()) < 40


def test_dare_ties_drops_then_elects_signs() -> None:
    vectors = [
        {"w": torch.tensor([2.0, -2.0, 1.0, 4.0])},
        {"w": torch.tensor([-1.0, 3.0, 1.0, 4.0])},
    ]
    merged = merge_task_vectors(vectors, "dare_ties", density=1.0, seed=0)
    # no drop: sign of the sum (1, 1, 2, 8) → +; disjoint mean of the positive entries
    torch.testing.assert_close(merged["w"], torch.tensor([2.0, 3.0, 1.0, 4.0]))


def test_task_merge_adds_the_merged_change_to_the_ancestor() -> None:
    ancestor = {"w": torch.tensor([10.0, 10.0]), "n": torch.tensor(1)}
    a = {"w": torch.tensor([13.0, 9.0]), "n": torch.tensor(2)}
    b = {"w": torch.tensor([11.0, 7.0]), "n": torch.tensor(3)}
    merged, kept = task_merge([a, b], ancestor, "ties", density=1.0)
    # τ = (3, −1), (1, −3): signs +, −; means 2, −2
    torch.testing.assert_close(merged["w"], torch.tensor([12.0, 8.0]))
    assert merged["n"].item() == 2 and kept == 1.0  # non-floating: the first version's


def test_trimming_weights_is_not_trimming_changes() -> None:
    """A large weight that did not move must not survive TIES' trim as if it had."""
    ancestor = {"w": torch.tensor([100.0, 0.0, 0.0, 0.0])}
    versions = [
        {"w": torch.tensor([100.0, 1.0, 0.0, 0.0])},
        {"w": torch.tensor([100.0, 0.0, 2.0, 0.0])},
    ]
    merged, kept = task_merge(versions, ancestor, "ties", density=0.25)
    torch.testing.assert_close(merged["w"], torch.tensor([100.0, 1.0, 2.0, 0.0]))
    assert kept == 0.5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "ties", "density": 0.0}, "density"),
        ({"method": "ties", "density": 1.5}, "density"),
        ({"method": "magnitude", "density": 0.5}, "expected one of"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        merge_task_vectors([{"w": torch.ones(3)}], **kwargs)


def test_an_ancestor_of_another_shape_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'w' has shape"):
        task_vectors([{"w": torch.ones(3)}], {"w": torch.ones(4)})


def test_a_folded_lora_version_s_task_vector_is_its_delta_w() -> None:
    """τ of a LoRA version against the model it was trained from is (α/r)·B·A on the adapted
    Linear (what the merge combines) and exactly zero elsewhere."""

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = attach_lora(base, LoraSettings(r=2, alpha=4, target_modules=["0"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_()
    delta = lora_delta_weights(adapter_state_dict(peft_model), scaling=lora_scalings(peft_model))
    folded = merge_adapter(peft_model).state_dict()
    (tau,) = task_vectors([folded], before)
    torch.testing.assert_close(tau["0.weight"], delta["0.weight"], rtol=0, atol=1e-6)
    assert all(torch.count_nonzero(tau[k]) == 0 for k in tau if k != "0.weight")


def test_apply_task_vector_keeps_dtypes() -> None:
    ancestor = {"w": torch.ones(2, dtype=torch.bfloat16)}
    merged = apply_task_vector(ancestor, {"w": torch.full((2,), 0.5)}, ancestor)
    assert merged["w"].dtype == torch.bfloat16
    torch.testing.assert_close(merged["w"].float(), torch.full((2,), 1.5))
