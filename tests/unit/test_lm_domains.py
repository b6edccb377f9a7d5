"""The causal-LM benchmark's pure parts: domains, tokenizer, perplexity maths, method configs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.lm_domains import (
    BOS,
    EOS,
    ModelSize,
    build_domains,
    build_tiny_llama,
    corpus_log_perplexity,
    forgetting,
    scores,
    split_domains,
    target_checks,
    train_tokenizer,
)

POOLS = {
    "a": [f"alpha sentence number {i}." for i in range(30)] + ["shared licence line."],
    "b": [f"beta sentence number {i}." for i in range(25)] + ["shared licence line."],
}


def test_domains_are_sized_disjoint_and_drop_shared_sentences() -> None:
    domains = split_domains(POOLS, per_domain=20, held_out_fraction=0.25)
    assert [d.name for d in domains] == ["a", "b"]
    for d in domains:
        assert (len(d.train), len(d.held_out)) == (15, 5)
        assert not set(d.train) & set(d.held_out)
        assert "shared licence line." not in d.train + d.held_out


def test_domains_do_not_depend_on_pool_order() -> None:
    shuffled = {k: list(reversed(v)) for k, v in POOLS.items()}
    assert split_domains(POOLS, 20, 0.25) == split_domains(shuffled, 20, 0.25)


def test_domains_refuse_too_little_text_or_no_held_out() -> None:
    with pytest.raises(ValueError, match="'b' has 25 usable sentences, 26 needed"):
        split_domains(POOLS, per_domain=26, held_out_fraction=0.25)
    with pytest.raises(ValueError, match="no held-out"):
        split_domains(POOLS, per_domain=20, held_out_fraction=0.01)


def test_domains_from_installed_packages_docstrings() -> None:
    domains = build_domains(["pandas", "prefect"], per_domain=100)
    assert [len(d.held_out) for d in domains] == [20, 20]
    assert all(len(s) >= 30 for d in domains for s in d.train)


def test_tokenizer_wraps_rows_and_knows_every_byte() -> None:
    tokenizer = train_tokenizer([f"tensor {i} of the graph" for i in range(50)], vocab=300)
    ids = tokenizer("ünïcode never seen")["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids(BOS)
    assert ids[-1] == tokenizer.convert_tokens_to_ids(EOS)
    assert tokenizer.pad_token_id == 0 and tokenizer.unk_token_id is None
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "ünïcode never seen"


def test_tiny_llama_loads_as_the_product_loads_it(tmp_path: Path) -> None:
    from continual.causal_lm import HFCausalLM, token_log_likelihood

    size = ModelSize(hidden=16, layers=1, heads=2, vocab=300, max_length=16)
    build_tiny_llama(tmp_path, [f"tensor {i} of the graph" for i in range(50)], size)
    model = HFCausalLM(tmp_path, max_length=16)
    ll = token_log_likelihood(model, model.tokenize(["tensor 3 of the graph"]))
    assert -math.log(len(model.tokenizer)) - 1 < ll[0] < 0  # untrained: near uniform


def test_corpus_log_perplexity_weights_rows_by_tokens() -> None:
    # rows of 1 and 3 predicted tokens with mean log-likelihoods -1 and -3: NLL 1 + 9 over 4
    assert corpus_log_perplexity(np.array([-1.0, -3.0]), np.array([1, 3])) == pytest.approx(2.5)
    with pytest.raises(ValueError):
        corpus_log_perplexity(np.array([-1.0]), np.array([0]))


def test_forgetting_is_the_increase_since_the_best_after_learning() -> None:
    nan = np.nan
    L = np.array(
        [
            [4.0, 9.0, 9.0],
            [3.0, 5.0, 9.0],  # domain 0 improved after step 0: its best is 3.0
            [3.5, 5.5, 4.0],
        ]
    )
    assert forgetting(L) == pytest.approx(((3.5 - 3.0) + (5.5 - 5.0)) / 2)
    assert math.isnan(forgetting(L[:1]))
    improving = np.array([[4.0, nan], [3.0, 5.0]])
    assert forgetting(improving) == pytest.approx(-1.0)  # backward transfer: negative


def test_scores_are_geometric_means_of_the_last_row() -> None:
    L = np.log(np.array([[100.0, 400.0, 900.0], [50.0, 200.0, 800.0], [40.0, 160.0, 90.0]]))
    s = scores(L)
    assert s["average_ppl"] == pytest.approx((40 * 160 * 90) ** (1 / 3))
    assert s["old_ppl"] == pytest.approx(80.0)
    assert s["new_ppl"] == pytest.approx(90.0)


def test_target_checks_compare_replay_with_joint_and_naive() -> None:
    t = target_checks(
        replay={"old_ppl": 104.0, "new_ppl": 110.0},
        joint={"old_ppl": 100.0, "new_ppl": 1.0},
        naive={"old_ppl": 1.0, "new_ppl": 100.0},
    )
    assert t["replay_old_vs_joint"] == pytest.approx(0.04) and t["old_within_margin"]
    assert t["replay_new_vs_naive"] == pytest.approx(0.10) and not t["new_within_margin"]


def test_each_method_config_sets_its_knob_and_the_same_budget(tmp_path: Path) -> None:
    from benchmarks.bench_causal_lm import FULL, METHODS, overrides, registry_name
    from evergreen.cli import main
    from evergreen.config import load_config

    config = tmp_path / "evergreen.yaml"
    assert main(["init", "--path", str(config)]) == 0
    llama = tmp_path / "llama"
    cfgs = {
        m: load_config(config, [*overrides(tmp_path, registry_name(m), llama, FULL), *x])
        for m, (_, x) in METHODS.items()
    }
    assert cfgs["naive"].weekly.replay_ratio == 0 and cfgs["naive"].weekly.distill_weight == 0
    for method in ("naive", "replay", "distill"):  # one mechanism each
        assert cfgs[method].weekly.ewc_lambda == 0
    assert cfgs["replay-ewc"].weekly.ewc_lambda == "auto"
    assert cfgs["replay-ewc"].weekly.replay_ratio == pytest.approx(0.5)
    assert cfgs["replay"].weekly.replay_ratio == pytest.approx(0.5)
    assert cfgs["replay-20"].weekly.replay_ratio == pytest.approx(0.2)
    assert cfgs["replay-20"].weekly.ewc_lambda == 0
    assert cfgs["replay"].weekly.distill_weight == 0
    assert cfgs["distill"].weekly.distill_weight > 0
    assert cfgs["distill"].weekly.replay_ratio == pytest.approx(0.5)
    assert cfgs["daily-lora"].daily.replay_ratio == pytest.approx(0.2)
    for cfg in cfgs.values():
        assert cfg.model.family == "hf-causal-lm" and cfg.data.text_only
        assert cfg.weekly.train.steps == cfg.daily.train.steps == FULL.update_steps
        assert cfg.weekly.train.epochs == cfg.daily.train.epochs == 0
        assert cfg.weekly.train.lr == cfg.daily.train.lr == cfg.bootstrap.train.lr
        assert cfg.gate == cfgs["naive"].gate.__class__()  # the gate as shipped
