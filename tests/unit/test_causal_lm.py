"""The causal-LM family: padding never counts in the loss or the score; config rules;
generation in the served model (bounded, greedy unless asked, prompt excluded); distillation
from the previous champion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from continual.causal_lm import (
    IGNORE_INDEX,
    MAX_NEW_TOKENS_LIMIT,
    GenerationSettings,
    HFCausalLM,
    generate_continuations,
    generation_settings,
    has_next_token,
    next_token_labels,
    next_token_loss,
    token_log_likelihood,
)
from continual.checkpoint import save_checkpoint
from continual.distillation import TokenDistiller, distillation_loss
from continual.inference import row_scores
from continual.models import CAUSAL_LM, ModelSpec, build_model
from continual.training import TrainSettings, train
from evergreen.config import EvergreenConfig
from model_registry.pyfunc_model import EvergreenPyfunc, example_and_signature
from tests.checkpoints import tiny_checkpoint
from tests.tiny_llama import sentences, tiny_llama


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama") / "m")


@pytest.fixture(scope="module")
def model(llama_path) -> HFCausalLM:
    spec = ModelSpec(family=CAUSAL_LM, n_features=16, n_classes=42, hf_path=str(llama_path))
    built = build_model(spec)
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


def test_the_gate_leaves_out_rows_with_no_token_to_predict(model, llama_path):
    """A one-word row has no next token to predict: it scored 0.0 for champion and challenger,
    a tie that counted in the gate's n (and 0.0 nats, the best score a row can have, in its
    batch's reference and a first champion's floor). The gate now decides as it would on the
    rows it can score, and says how many it left out."""
    import copy

    from prefect.logging import disable_run_logger

    from evergreen.errors import ConfigError
    from tasks.evaluate import evaluate_against_champion
    from tasks.memory import BATCH_COLUMN, DataMemory
    from tasks.state import ModelState

    spec = ModelSpec(
        family=CAUSAL_LM,
        n_features=16,
        n_classes=42,
        feature_columns=["text"],
        hf_path=str(llama_path),
    )
    old, new = sentences("kitchen", 30, seed=1), sentences("harbour", 30, seed=2)
    trained = copy.deepcopy(model)
    X = model.tokenize(sentences("harbour", 64, seed=3))
    train(trained, X, torch.zeros(len(X), dtype=torch.long), TrainSettings(steps=10, lr=1e-2))
    challenger = ModelState(model=trained, spec=spec)
    champion = ModelState(
        model=model, spec=spec, version="1", learned=frozenset({"b1"}), references={"b1": -3.0}
    )
    scorable = pd.DataFrame({"text": old + new, BATCH_COLUMN: ["b1"] * 30 + ["b2"] * 30})
    one_word = pd.DataFrame({"text": ["bread", "salt", "boat", "gull", "tide"]})
    one_word[BATCH_COLUMN] = ["b1", "b2", "b2", "b2", "b2"]
    assert not has_next_token(model, model.tokenize(one_word["text"].tolist())).any()
    cfg = EvergreenConfig.model_validate(
        {**_config(), "model": {"family": CAUSAL_LM, "hf_path": str(llama_path)}}
    )

    def gate(rows: pd.DataFrame, champion: ModelState | None):
        memory = DataMemory(batches=("b1", "b2"), held_out={"gate": rows.reset_index(drop=True)})
        with disable_run_logger():
            return evaluate_against_champion.fn(cfg, champion, challenger, memory)

    clean = gate(scorable, champion)
    mixed = gate(pd.concat([scorable, one_word]), champion)
    assert mixed.decision.new_data.n == clean.decision.new_data.n == 30
    assert mixed.decision.retention.n == clean.decision.retention.n == 30
    assert mixed.decision.new_data == clean.decision.new_data
    assert mixed.decision.retention == clean.decision.retention
    assert mixed.challenger.references == clean.challenger.references
    assert mixed.decision.promote == clean.decision.promote
    note = "left out 4 new and 1 retention gate row(s) of fewer than 2 tokens"
    assert mixed.decision.reasons == (*clean.decision.reasons, mixed.decision.reasons[-1])
    assert mixed.decision.reasons[-1].startswith(note)
    assert not any("fewer than 2 tokens" in r for r in clean.decision.reasons)
    with pytest.raises(ConfigError, match=r"every gate row .* has fewer than 2 tokens"):
        gate(pd.concat([scorable[:30], one_word[1:]]), champion)  # no new row to score
    first = gate(pd.concat([scorable, one_word]), None)  # a first champion's floor
    assert (
        first.decision.challenger_new_accuracy
        == gate(scorable, None).decision.challenger_new_accuracy
    )


def test_causal_lm_config_needs_no_classes_and_replays_half_weekly():
    cfg = EvergreenConfig.model_validate(_config())
    assert cfg.data.text_only and cfg.weekly.replay_ratio == pytest.approx(0.5)
    assert cfg.daily.replay_ratio == pytest.approx(0.2)
    chosen = _config()
    chosen["weekly"] = {"replay_ratio": 0.3}
    assert EvergreenConfig.model_validate(chosen).weekly.replay_ratio == 0.3
    again = EvergreenConfig.model_validate(cfg.model_dump())  # a dumped config loads again
    assert again.data.text_only


def test_the_daily_keeps_150_steps_for_a_causal_lm_unless_set():
    """The classifiers' daily default rose to 300 steps (chosen on tabular validation families);
    the causal LM keeps the 150 its recipe was measured with, and a set count stands."""
    assert EvergreenConfig.model_validate(_config()).daily.train.steps == 150
    chosen = _config()
    chosen["daily"] = {"train": {"steps": 40}}
    assert EvergreenConfig.model_validate(chosen).daily.train.steps == 40
    tabular = EvergreenConfig.model_validate(
        {"data": {"landing": "/tmp/x", "features": ["a"], "classes": [0, 1]}}
    )
    assert tabular.daily.train.steps == 300


def test_causal_lm_training_warms_up_and_decays_the_lr_unless_set():
    cfg = EvergreenConfig.model_validate(_config())
    for section in (cfg.bootstrap.train, cfg.weekly.train, cfg.monthly.train, cfg.daily.train):
        assert (section.lr_schedule, section.warmup_fraction) == ("cosine", 0.05)
    chosen = _config()
    chosen["weekly"] = {"train": {"steps": 10, "lr_schedule": "constant", "warmup_fraction": 0}}
    weekly = EvergreenConfig.model_validate(chosen).weekly.train
    assert (weekly.lr_schedule, weekly.warmup_fraction) == ("constant", 0)
    tabular = EvergreenConfig.model_validate(
        {"data": {"landing": "/tmp/x", "features": ["a"], "classes": [0, 1]}}
    )
    assert (tabular.weekly.train.lr_schedule, tabular.weekly.train.warmup_fraction) == (
        "constant",
        0.0,
    )


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        (_config(classes=["a", "b"]), "remove data.classes"),
        (_config(label="topic"), "remove data.label"),
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


# ---- generation in the served model ----


def _greedy_reference(model: HFCausalLM, text: str, n: int) -> list[int]:
    """Brute force: one full forward pass per new token on the unpadded prompt."""
    ids = torch.tensor([model.tokenizer(text)["input_ids"]])
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(n):
            best = model.lm(input_ids=ids).logits[0, -1].argmax()
            if int(best) == model.tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, best.view(1, 1)], dim=1)
    return ids[0, start:].tolist()


def test_greedy_generation_continues_each_prompt_as_a_token_by_token_loop(model):
    prompts = ["bread of the", "salt", "the oven with butter and the knife on a bowl of soup"]
    out = generate_continuations(model, prompts, GenerationSettings(max_new_tokens=6))
    for prompt, text in zip(prompts, out, strict=True):  # left padding changes nothing
        reference = _greedy_reference(model, prompt, 6)
        expected = model.tokenizer.decode(reference, skip_special_tokens=True)
        assert text == expected.strip() and text
        assert len(text.split()) <= 6  # continuation only: the prompt is not repeated
    assert generate_continuations(model, prompts, GenerationSettings()) == ["", "", ""]


def test_sampling_is_seeded_and_leaves_the_callers_rng_alone(model):
    prompts = ["bread of the", "boat"]
    hot = GenerationSettings(max_new_tokens=8, temperature=5.0, seed=1)
    torch.manual_seed(123)
    first = generate_continuations(model, prompts, hot)
    after = torch.rand(1)
    torch.manual_seed(123)
    assert generate_continuations(model, prompts, hot) == first
    assert torch.equal(torch.rand(1), after)
    other = generate_continuations(model, prompts, GenerationSettings(8, 5.0, seed=2))
    assert other != first


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"max_new_tokens": MAX_NEW_TOKENS_LIMIT + 1}, "max_new_tokens must be an integer"),
        ({"max_new_tokens": -1}, "from 0"),
        ({"max_new_tokens": 2.5}, "got 2.5"),
        ({"max_new_tokens": True}, "got True"),
        ({"temperature": -0.5}, "temperature must be a number >= 0"),
        ({"temperature": float("nan")}, "temperature"),
        ({"seed": "x"}, "seed must be an integer"),
    ],
)
def test_generation_params_out_of_bounds_are_refused(params, message):
    with pytest.raises(ValueError, match=message):
        generation_settings(params)


def test_generation_params_default_to_no_generation():
    assert generation_settings(None) == GenerationSettings(0, 0.0, 0)
    given = {"max_new_tokens": np.int64(MAX_NEW_TOKENS_LIMIT), "temperature": 1}
    assert generation_settings(given) == GenerationSettings(MAX_NEW_TOKENS_LIMIT, 1.0, 0)


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    spec = ModelSpec(
        family=CAUSAL_LM,
        n_features=16,
        n_classes=model.vocab_size,
        hf_path=model.lm.name_or_path,
        feature_columns=["text"],
    )
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "lm", model, spec)


def test_served_lm_generates_only_when_asked_and_declares_its_params(checkpoint, model):
    _, signature = example_and_signature(checkpoint)
    assert {p.name: p.default for p in signature.params.params} == {
        "max_new_tokens": 0,
        "temperature": 0.0,
        "seed": 0,
    }
    outputs = {c.name: c.required for c in signature.outputs.inputs}
    assert outputs == {"log_likelihood": True, "perplexity": True, "generated": False}
    assert signature.inputs.input_names() == ["text"]

    served = EvergreenPyfunc().load_checkpoint_dir(checkpoint)
    frame = pd.DataFrame({"text": ["bread of the", "boat"]}, index=[7, 9])
    plain = served.predict(None, frame)
    assert list(plain.columns) == ["log_likelihood", "perplexity"]
    out = served.predict(None, frame, {"max_new_tokens": 5})
    assert list(out.columns) == ["log_likelihood", "perplexity", "generated"]
    assert list(out.index) == [7, 9]
    pd.testing.assert_frame_equal(out[plain.columns], plain)
    expected = generate_continuations(model, list(frame["text"]), GenerationSettings(5))
    assert out["generated"].tolist() == expected
    with pytest.raises(ValueError, match=f"to {MAX_NEW_TOKENS_LIMIT}, got 1000"):
        served.predict(None, frame, {"max_new_tokens": 1000})


def test_served_lm_scores_no_row_it_cannot_score(checkpoint):
    """A row with no token to predict (empty, or one token with no BOS) has no mean
    log-likelihood: NaN, not 0.0 / perplexity 1.0 (a perfect score); a null text is refused
    instead of being scored as the string "None"."""
    served = EvergreenPyfunc().load_checkpoint_dir(checkpoint)
    out = served.predict(None, pd.DataFrame({"text": ["bread of the", "", "boat"]}))
    assert np.isfinite(out["log_likelihood"].iloc[0]) and out["log_likelihood"].iloc[0] < 0
    assert out[["log_likelihood", "perplexity"]].iloc[1:].isna().all().all()
    with pytest.raises(ValueError, match=r"'text' is null in 1 row \(row 8\)"):
        served.predict(None, pd.DataFrame({"text": ["bread", None]}, index=[7, 8]))


def test_tabular_signature_has_no_params(tmp_path):
    _, signature = example_and_signature(tiny_checkpoint(tmp_path / "c", 0, ["a", "b"], [0, 1]))
    assert signature.params is None
    assert signature.outputs.input_names() == [
        "prediction",
        "probability",
        "probability_0",
        "probability_1",
    ]


# ---- distillation from the previous champion ----


def _kl_to(teacher: HFCausalLM, student: HFCausalLM, ids: torch.Tensor) -> float:
    """Mean per-token KL(teacher ‖ student) over the real next-token positions (T = 1)."""
    mask = next_token_labels(ids, teacher.pad_token_id) != IGNORE_INDEX
    width = mask.shape[1]
    with torch.no_grad():
        kl = distillation_loss(student(ids)[:, :width], teacher(ids)[:, :width], 1.0, mask=mask)
    return float(kl)


def test_distillation_keeps_the_update_closer_to_the_champion(model):
    import copy

    champion = copy.deepcopy(model)
    old = champion.tokenize(sentences("kitchen", 48, seed=1))
    zeros = torch.zeros(len(old), dtype=torch.long)
    train(champion, old, zeros, TrainSettings(steps=30, batch_size=16, lr=1e-2, seed=0))
    frozen = {k: v.clone() for k, v in champion.state_dict().items()}
    new = champion.tokenize(sentences("harbour", 48, seed=2))
    settings = TrainSettings(steps=20, batch_size=16, lr=1e-2, seed=0)
    kl = {}
    for weight in (0.0, 1.0):
        student = copy.deepcopy(champion)
        teacher = TokenDistiller(champion, weight=weight, pad_token_id=champion.pad_token_id)
        train(student, new, zeros, settings, distiller=teacher)
        kl[weight] = (_kl_to(champion, student, old), _kl_to(champion, student, new))
    # measured: old 3.10 → 0.87, new 5.01 → 0.64 nats per token
    assert kl[1.0][0] < 0.7 * kl[0.0][0]  # old text: the champion's predictions kept
    assert kl[1.0][1] < 0.7 * kl[0.0][1]  # and on the batch it was distilled on
    assert all(torch.equal(v, champion.state_dict()[k]) for k, v in frozen.items())


def test_distillation_config_is_for_causal_lms_in_one_process():
    tree = _config()
    tree["weekly"] = {"distill_weight": 0.5, "distill_temperature": 1.0}
    cfg = EvergreenConfig.model_validate(tree)
    assert (cfg.weekly.distill_weight, cfg.daily.distill_weight) == (0.5, 0.0)
    classifier = {
        "data": {"landing": "/tmp/x", "features": ["f"], "classes": [0, 1]},
        "daily": {"distill_weight": 1.0},
    }
    with pytest.raises(ValueError, match=r"daily.distill_weight .* hf-causal-lm only"):
        EvergreenConfig.model_validate(classifier)
    tree["weekly"]["train"] = {"processes": 2}
    with pytest.raises(ValueError, match=r"weekly.train.processes: 1"):
        EvergreenConfig.model_validate(tree)
    tree["weekly"] = {"distill_weight": -1}
    with pytest.raises(ValueError, match="distill_weight"):
        EvergreenConfig.model_validate(tree)


def test_merge_estimates_a_missing_own_fisher_on_a_frozen_loaded_version(model):
    """A version without an own Fisher is weighed by one estimated on replay rows. A loaded
    version can be frozen (a LoRA version is folded on load with requires_grad off): the estimate
    runs on a trainable copy, with the family's Fisher kind, and leaves the version as it was.
    Before: "no trainable parameters" from `diagonal_fisher`, and the merge of a causal LM failed."""
    import copy

    from prefect.logging import disable_run_logger

    from continual.replay import ReservoirBuffer
    from tasks.memory import DataMemory
    from tasks.merge import _own_fisher
    from tasks.state import ModelState

    frozen = copy.deepcopy(model).requires_grad_(False)
    spec = ModelSpec(family=CAUSAL_LM, n_features=16, n_classes=42, hf_path="unused")
    X = model.tokenize(sentences("harbour", 24, seed=3))
    buffer = ReservoirBuffer(64, X.shape[1], dtype=torch.long)
    buffer.add(X, torch.zeros(len(X), dtype=torch.long), "b1")
    with disable_run_logger():
        fisher = _own_fisher(
            ModelState(model=frozen, spec=spec, version="2"), DataMemory(buffer=buffer)
        )
    assert set(fisher) == {name for name, _ in model.named_parameters()}
    assert all(bool(f.isfinite().all()) and bool((f >= 0).all()) for f in fisher.values())
    assert sum(float(f.sum()) for f in fisher.values()) > 0
    assert not any(p.requires_grad for p in frozen.parameters())  # the version is untouched


def test_per_example_loss_of_a_causal_lm_is_the_rows_mean_token_nll(model):
    """The stream monitor's input for a causal LM: one loss per row, −(mean token log-lik.).
    Before: cross-entropy of [N, L, V] logits against [N] labels raised on the shapes."""
    from continual.inference import per_example_loss

    X = model.tokenize(sentences("office", 5, seed=4))
    y = torch.zeros(len(X), dtype=torch.long)  # placeholders, as the flows carry them
    losses = per_example_loss(model, X, y)
    assert losses.shape == (5,) and losses.dtype == np.float64
    np.testing.assert_allclose(losses, -token_log_likelihood(model, X), rtol=1e-6)
    with torch.no_grad():
        first = next_token_loss(model(X[:1]), X[:1], model.pad_token_id)
    assert losses[0] == pytest.approx(float(first), abs=1e-5)


def test_the_streams_online_step_trains_a_causal_lm_on_its_next_token_loss(model):
    """stream-monitor's online SGD step on a causal LM: the next-token loss of the ids, as the
    training loop takes it. Before: cross-entropy of [N, L, V] logits against the [N]
    placeholder labels ("Expected target size [16, 42], got [16]")."""
    import copy

    from tasks.stream import _online_step

    student = copy.deepcopy(model).requires_grad_(True)
    X = model.tokenize(sentences("harbour", 16, seed=5))
    y = torch.zeros(len(X), dtype=torch.long)
    with torch.no_grad():
        before = float(next_token_loss(student(X), X, model.pad_token_id))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    for _ in range(3):
        _online_step(student, optimizer, X, y)
    with torch.no_grad():
        after = float(next_token_loss(student(X), X, model.pad_token_id))
    assert after < before


def test_the_lora_select_check_leaves_out_rows_with_no_token_to_predict(model, llama_path):
    """The daily's keep/discard check on the select rows reads them as the gate does: one-word
    rows (no token to predict) would be ties at 0.0 counted in its n."""
    import copy

    from evergreen.config import EvergreenConfig
    from tasks.state import ModelState
    from tasks.train_lora import _selection_decision
    from tasks.train_start import Selection

    spec = ModelSpec(family=CAUSAL_LM, n_features=16, n_classes=42, hf_path=str(llama_path))
    trained = copy.deepcopy(model)
    X = model.tokenize(sentences("harbour", 64, seed=3))
    train(trained, X, torch.zeros(len(X), dtype=torch.long), TrainSettings(steps=10, lr=1e-2))
    champion = ModelState(model=model, spec=spec)
    cfg = EvergreenConfig.model_validate(
        {**_config(), "model": {"family": CAUSAL_LM, "hf_path": str(llama_path)}}
    )

    def check(texts: list[str]):
        ids = model.tokenize(texts)
        selection = Selection(new=(ids, torch.zeros(len(ids), dtype=torch.long)), old=None)
        return _selection_decision(cfg, champion, selection, trained)

    clean = sentences("harbour", 30, seed=4)
    mixed = check([*clean, "bread", "salt", "boat", "gull"])
    assert mixed.new_data.n == check(clean).new_data.n == 30
    assert mixed.new_data == check(clean).new_data
    with pytest.raises(ValueError, match="two tokens"):
        check(["bread", "salt"])
