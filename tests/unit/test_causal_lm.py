"""The causal-LM family: padding never counts in the loss or the score; config rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from continual.causal_lm import HFCausalLM, next_token_loss, token_log_likelihood
from continual.models import CAUSAL_LM, ModelSpec, build_model
from continual.training import TrainSettings, row_scores, train
from evergreen.config import EvergreenConfig
from tests.tiny_llama import sentences, tiny_llama


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> HFCausalLM:
    path = tiny_llama(tmp_path_factory.mktemp("llama") / "m")
    built = build_model(ModelSpec(family=CAUSAL_LM, n_features=16, n_classes=42, hf_path=str(path)))
    assert isinstance(built, HFCausalLM)
    return built


def test_padding_changes_neither_loss_nor_score(model):
    ids = model.tokenize(["bread of the oven with salt"])
    short = ids[:, : int((ids != model.pad_token_id).sum())]
    with torch.no_grad():
        padded_loss = next_token_loss(model(ids), ids, model.pad_token_id)
        short_loss = next_token_loss(model(short), short, model.pad_token_id)
    assert float(padded_loss) == pytest.approx(float(short_loss), abs=1e-5)
    score = token_log_likelihood(model, ids)
    assert score.shape == (1,) and score[0] == pytest.approx(-float(short_loss), abs=1e-5)


def test_row_scores_are_log_likelihoods_and_training_raises_them(model):
    import copy

    X = model.tokenize(sentences("kitchen", 48, seed=1))
    y = torch.zeros(len(X), dtype=torch.long)  # placeholders: the targets are the ids
    before = row_scores(model, X, y)
    assert before.dtype == np.float64 and np.all(before < 0)
    trained = copy.deepcopy(model)
    train(trained, X, y, TrainSettings(steps=30, batch_size=16, lr=1e-2, seed=0))
    assert row_scores(trained, X, y).mean() > before.mean() + 0.5


def _config(**data) -> dict:
    return {
        "data": {"landing": "/tmp/x", "text": "text", **data},
        "model": {"family": "hf-causal-lm", "hf_path": "/tmp/m"},
    }


def test_causal_lm_config_needs_no_classes_and_replays_20_percent():
    cfg = EvergreenConfig.model_validate(_config())
    assert cfg.data.text_only and cfg.weekly.replay_ratio == pytest.approx(0.2)
    chosen = _config()
    chosen["weekly"] = {"replay_ratio": 0.5}
    assert EvergreenConfig.model_validate(chosen).weekly.replay_ratio == 0.5
    again = EvergreenConfig.model_validate(cfg.model_dump())  # a dumped config loads again
    assert again.data.text_only


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        (_config(classes=["a", "b"]), "remove data.classes"),
        (
            {
                "data": {"landing": "/tmp/x", "features": ["f"]},
                "model": {"family": "hf-causal-lm", "hf_path": "/tmp/m"},
            },
            "set data.text",
        ),
        ({"data": {"landing": "/tmp/x", "features": ["f"]}}, "at least two classes"),
    ],
)
def test_config_errors_say_what_to_change(tree, message):
    with pytest.raises(ValueError, match=message):
        EvergreenConfig.model_validate(tree)


def _brute_force_sequence_fisher(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """One autograd pass per sequence: g_n = ∂(Σ_t −log p(x_t | x_<t), pads skipped)/∂θ, and
    F = (1/N) Σ_n g_n², written without the library's loss or vmap."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    for row in ids:
        length = int((row != model.pad_token_id).sum())  # right-padded: the real tokens first
        logits = model(row.unsqueeze(0))[0]
        nll = torch.nn.functional.cross_entropy(
            logits[: length - 1], row[1:length], reduction="sum"
        )
        grads = torch.autograd.grad(nll, list(params.values()), allow_unused=True)
        for (name, _), g in zip(params.items(), grads, strict=True):
            if g is not None:
                total[name] += g.square()
    return {n: t / len(ids) for n, t in total.items()}


@pytest.mark.parametrize("trainable", ["all", "attention-and-mlp"])
def test_fisher_of_a_causal_lm_is_the_per_sequence_empirical_fisher(model, trainable):
    """Per-sequence gradients of the summed next-token NLL, padding masked, through the
    library's per-example machinery, against a plain loop: every parameter trainable (vmap
    path: embeddings, norms) and only the attention/MLP Linear layers (closed-form hook path)."""
    import copy

    from continual.fisher import diagonal_fisher, fisher_paths

    lm = copy.deepcopy(model)
    if trainable != "all":
        for name, p in lm.named_parameters():
            p.requires_grad_(".self_attn." in name or ".mlp." in name)
    texts = [*sentences("harbour", 5, seed=3), "boat"]  # a one-token row contributes nothing
    ids = lm.tokenize(texts)
    assert int((ids == lm.pad_token_id).sum()) > 0  # rows of different lengths
    placeholders = torch.zeros(len(ids), dtype=torch.long)
    fisher = diagonal_fisher(lm, ids, placeholders, batch_size=4)
    expected = _brute_force_sequence_fisher(lm, ids)
    assert set(fisher) == set(expected)
    for name, value in expected.items():
        scale = float(value.abs().max())
        assert scale > 0, name
        assert float((fisher[name] - value).abs().max()) <= 1e-5 * scale, name
    paths = set(fisher_paths(lm, ids, placeholders).values())
    assert paths == ({"vmap"} if trainable == "all" else {"linear"})
    with pytest.raises(ValueError, match="not implemented for a causal LM"):
        diagonal_fisher(lm, ids, placeholders, kind="sampled")
    assert lm.mask_padding  # the unmasked forward was for the estimate only


def test_causal_lm_fisher_refuses_left_padding(model):
    from continual.fisher import diagonal_fisher

    ids = model.tokenize(["boat sail rope"])
    left = torch.cat([ids[:, -2:], ids[:, :-2]], dim=1)  # pads moved to the front
    with pytest.raises(ValueError, match="right-padded"):
        diagonal_fisher(model, left, torch.zeros(1, dtype=torch.long))
